"""The four trainers keep their loops in plain sight, one copy each (cleanRL's trade-off): this test keeps the
copies in step. Each script's `with log:` block — Algorithm 1's loop — must be the same text as SD1.5's once
the denoiser's name is mapped (`transformer` → `unet`); what differs between the models lives in the functions
the loop calls (encode, add_noise, predict) and in the lines before it."""

import pytest

from helpers import ROOT

NAMES = {"transformer": "unet"}  # the only model-specific name the loops may use


def loop(script: str) -> str:
    """The script's `with log:` block: from that line to the last line indented deeper than it."""
    lines = (ROOT / script).read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("    with log:"))
    end = next(i for i in range(start + 1, len(lines)) if lines[i].strip() and not lines[i].startswith("     "))
    text = "\n".join(lines[start:end]).rstrip()
    for name, common in NAMES.items():
        text = text.replace(name, common)
    return text


@pytest.mark.parametrize("script", ["train_sdxl.py", "train_sd3.py", "train_flux.py"])
def test_the_loop_is_sd15s_loop_with_the_denoisers_name_mapped(script):
    reference_loop, other = loop("train_sd15.py"), loop(script)
    assert reference_loop.count("\n") > 60  # the whole loop, not a stub
    assert other == reference_loop, "\n".join(
        f"{a!r}\n   vs {b!r}" for a, b in zip(reference_loop.splitlines(), other.splitlines()) if a != b)


def test_the_loop_calls_the_three_concept_files():
    text = loop("train_sd15.py")
    for call in ("schedule.sample_timesteps", "losses.per_sample_error", "objective.fn", "ref.step(",
                 "ref.divergence(", "reference.MONITOR_STREAM"):
        assert call in text, call
