"""Everything that runs without the model hub, at the bottom of the project: it imports libraries only.

- `cache`: the cache root ($RDPO_CACHE, else ~/.cache/rethinking-dpo) and `build_aside`, the one way every
  build-once file or folder of the project is made (written aside, fsync'ed, renamed into place);
- `tiny`: byte-level tokenizers, tiny pipelines of every family in the hub's on-disk layout, the real-size SD1.5
  architecture with random weights, the built-in smooth-vs-noise pairs, the tiny CLIP of the offline rewards;
- `toy`: the toy world (renderer, programmatic rewards, preference pairs), its pretraining script
  `toy_pretrain.py` and the committed base model `toy_model/` that `train_sd15.py --tiny` fine-tunes.
"""
