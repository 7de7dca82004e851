"""Full-parameter recovery (`--trainable full`) beside LoRA: what each trains, a LLaVA's vision tower left alone,
the loss on a fixed batch, an old resumable state refused, and bad values refused in one line; on tiny random
models. Resume after a kill in both modes: tests/test_finetune.py."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mop import cli, data
from mop.compare import method_config, parse_method
from mop.errors import MopError
from mop.models import load_model
from mop.pipeline import PipelineConfig
from mop.pruning.search import SearchConfig
from mop.training import FinetuneConfig, LoraSettings, checkpoints, finetune, loop, losses, recovery
from mop.training.lora import PROJECTIONS
from test_finetune import interrupt_after_first_state, small
from test_llava import VISUAL_PREFIXES, alpaca_rows, image_tokenizer, stored, tiny_llava  # noqa: F401 (fixtures)

STUDY = Path(__file__).resolve().parents[1] / "docs" / "study" / "smollm2"


def changed_tensors(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[str]:
    assert before.keys() == after.keys()
    return {name for name in before if not torch.equal(before[name], after[name])}


@pytest.mark.parametrize("family", ["llama-gqa", "llama-mha"])  # tied and untied embeddings
def test_full_recovery_changes_every_weight_and_lora_only_its_targets(tiny_dirs, tmp_path, family):
    model = tiny_dirs[family]
    original = load_file(model / "model.safetensors")
    full = finetune(str(model), tmp_path / "full", small(trainable="full", max_steps=2))
    lora = finetune(str(model), tmp_path / "lora", small(max_steps=2))
    assert (full["trainable"], lora["trainable"]) == ("full", "lora")
    assert changed_tensors(original, load_file(tmp_path / "full" / "model.safetensors")) == set(original)
    projections = {name for name in original if name.endswith(tuple(f".{p}.weight" for p in PROJECTIONS))}
    assert len(projections) == 7 * 6
    assert changed_tensors(original, load_file(tmp_path / "lora" / "model.safetensors")) == projections
    card = (tmp_path / "full" / "README.md").read_text()
    assert "full-parameter" in card and "full-recovered" in card and "LoRA" not in card


def test_full_recovery_of_a_llava_trains_its_language_model_only(tiny_llava, tmp_path):
    """Text-only training gives the vision tower no gradient either way: what must hold is that it is frozen, so
    that neither AdamW nor DDP nor the resumable state holds it."""
    model = load_model(str(tiny_llava)).model
    trained = checkpoints.trained_parameters(recovery.trainable_model(model, FinetuneConfig(trainable="full")))
    assert trained and all(name.startswith(("model.language_model.", "lm_head.")) for name in trained)
    assert len(trained) == len(model.model.language_model.state_dict()) + 1  # + lm_head (untied)

    out = tmp_path / "recovered"
    assert cli.main(["finetune", str(tiny_llava), "--out", str(out), "--trainable", "full",
                     "--data", str(alpaca_rows(tmp_path / "alpaca.json")), "--max-steps", "2", "--batch-size", "4",
                     "--micro-batch-size", "2", "--max-length", "256", "--lr", "1e-3"]) == 0
    before, after = stored(tiny_llava), stored(out)
    visual = {name for name in before if name.startswith(VISUAL_PREFIXES)}
    assert visual and changed_tensors(before, after) == set(before) - visual  # the tower, the projector: bit for bit
    assert json.loads((out / "mop.json").read_text())["finetune"]["settings"]["trainable"] == "full"


@pytest.mark.parametrize("method", ["sft", "kd"])
def test_full_training_lowers_the_loss_on_a_fixed_batch(tiny_dirs, method):
    """Four rows in a batch of four: every step sees the same batch. sft: cross-entropy on the rows' text; kd:
    the distance to a teacher that is the student with a sharper final norm."""
    loaded = load_model(str(tiny_dirs["llama-gqa"]))
    lines = (Path(os.environ["MOP_DATA_DIR"]) / "wikitext2" / "wiki.test.raw").read_text().splitlines()
    texts = [line for line in lines if len(line) > 200][:4]
    rows = [(ids.tolist(), ids.tolist()) for ids in data.token_segments(loaded.tokenizer, texts, 64)][:4]
    loss_fn = losses.cross_entropy_sum
    if method == "kd":
        teacher = load_model(str(tiny_dirs["llama-gqa"])).model
        with torch.no_grad():
            teacher.model.norm.weight.mul_(10)
        loss_fn = losses.distillation_sum(teacher)
    batch = loop._batch(rows, loaded.tokenizer.pad_token_id, torch.device("cpu"))
    targets = sum(losses.target_count(row) for row in rows)
    with torch.no_grad():
        before = loss_fn(loaded.model, batch).item() / targets
    settings = LoraSettings(learning_rate=1e-2, batch_size=4, micro_batch_size=2, max_length=64)
    trained = recovery.trainable_model(loaded.model, FinetuneConfig(lora=settings, trainable="full"))
    assert trained is loaded.model and all(p.requires_grad for p in trained.parameters())
    progress = loop.train(trained, rows, settings, 8, 0, loaded.tokenizer.pad_token_id, loss_fn)
    with torch.no_grad():
        after = loss_fn(recovery.plain_model(trained), batch).item() / targets
    assert progress.losses[0] == pytest.approx(before, rel=1e-5)  # the first step's loss is the untrained model's
    assert progress.losses[-1] < 0.9 * progress.losses[0]  # sft 6.25 -> 4.84, kd 1.65 -> 1.34
    assert after < 0.85 * before


def test_a_state_of_the_earlier_layout_is_refused_in_one_line(tiny_dirs, tmp_path, monkeypatch):
    """States written before full fine-tuning held `adapters.safetensors` in peft's names: refused, not mis-read."""
    model, out = str(tiny_dirs["llama-gqa"]), tmp_path / "resumed"
    state = interrupt_after_first_state(model, out, small(), monkeypatch)
    shutil.move(state / checkpoints.Checkpoints.TRAINED, state / "adapters.safetensors")
    with pytest.raises(MopError, match=f"has no {checkpoints.Checkpoints.TRAINED}") as refused:
        finetune(model, out, small())
    assert "\n" not in str(refused.value) and not out.exists()


def test_bad_trainable_is_refused_in_one_line(tiny_dirs, tmp_path, capsys):
    model = str(tiny_dirs["llama-gqa"])
    for argv in (["finetune", model, "--out", str(tmp_path / "out"), "--trainable", "x"],
                 ["run", model, "--target", "0.2", "--out", str(tmp_path / "out"), "--recovery-trainable", "all"]):
        assert cli.main(argv) == 2
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and "invalid choice" in error and "trainable" in error, error
        assert not (tmp_path / "out").exists()
    with pytest.raises(MopError, match="unknown trainable 'x'; choose one of lora, full"):
        FinetuneConfig(trainable="x").validate()
    base = PipelineConfig(search=SearchConfig(targets=[0.2]))
    with pytest.raises(MopError, match="unknown trainable"):
        method_config(base, parse_method("mop-x:recovery.trainable=x")[1])


def test_compare_specs_and_identities_carry_the_trainable(tiny_dirs):
    base = PipelineConfig(search=SearchConfig(targets=[0.2]))
    label, overrides = parse_method("mop-full:recovery.trainable=full,recovery.learning_rate=0.0001")
    config = method_config(base, overrides)
    assert (label, config.recovery.trainable, config.recovery.lora.learning_rate) == ("mop-full", "full", 1e-4)
    assert config.identity()["recovery"]["trainable"] == "full" and config.recovery.identity()["trainable"] == "full"
    # LoRA, the default, is left out: a run directory made before the option keeps its identity
    assert "trainable" not in base.identity()["recovery"] and "trainable" not in base.recovery.identity()
    saved = json.loads((STUDY / "width-kd" / "pipeline.json").read_text())["identity"]["recovery"]
    before = FinetuneConfig(**{**saved, "lora": LoraSettings(**saved["lora"])})
    assert PipelineConfig(search=SearchConfig(targets=[0.2]), recovery=before).identity()["recovery"] == saved
