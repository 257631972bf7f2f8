"""The paper in miniature: a toy world where a CPU reproduces (or refutes) the method (README, "The paper in
miniature"): the world and its rewards (toy.py), the base model's pretraining (toy_pretrain.py) and the
committed result (toy_model/), and the reproduction with its figures (reproduce.py, figures/)."""
