"""Recovery fine-tuning (`mop finetune`): training rows (the same as the search's short tuning), the loss, merged
checkpoints and their hash, the bf16 merge, resume, two processes, knowledge distillation and bad input, on tiny
random models."""

import copy
import functools
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import get_peft_model_state_dict
from peft.tuners.lora import Linear as LoraLinear
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from mop import cli, data, provenance
from mop.errors import MopError
from mop.models import load_model, save_checkpoint, weights_sha256
from mop.pruning.search import Search, SearchConfig
from mop.pruning.surgery import remove_layer
from mop.training import FinetuneConfig, LoraSettings, checkpoints, finetune, lora, loop, losses, recovery

SMALL = LoraSettings(rank=4, batch_size=4, micro_batch_size=2, max_length=256)  # the tiny tokenizer is verbose


def small(**options) -> FinetuneConfig:
    return FinetuneConfig(**{"lora": SMALL, "max_steps": 4, "save_every": 2, **options})


def alpaca_file(path: Path, rows: list[dict]) -> Path:
    path.write_text(json.dumps(rows))
    return path


def text_file(path: Path, lines: int = 150) -> Path:
    """The first `lines` lines of WikiText-2 test."""
    wikitext = Path(os.environ["MOP_DATA_DIR"], "wikitext2", "wiki.test.raw").read_text().splitlines()
    path.write_text("\n".join(wikitext[:lines]))
    return path


@pytest.mark.parametrize("which", ["tiny", "smollm2"])
def test_rows_mask_the_prompt_keep_eos_and_drop_rows_without_response(which, tokenizer, request, tmp_path):
    if which == "smollm2":
        tokenizer = AutoTokenizer.from_pretrained(request.getfixturevalue("smollm2_dir"))
    long_prompt = "word " * 600
    source = alpaca_file(tmp_path / "rows.json", [
        {"instruction": "Name a colour.", "input": "", "output": "Blue."},
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
        {"instruction": "Say nothing.", "input": "", "output": "  "},  # no response: dropped
        {"instruction": long_prompt, "input": "", "output": "Cut away."},  # response beyond max_length: dropped
    ])
    rows, record = recovery.alpaca_rows(tokenizer, str(source), max_length=256)
    assert (record["examples"], record["rows"], record["dropped"]) == (4, 2, 2)
    for (ids, labels), row in zip(rows, ["Blue.", "5"]):
        prompt_length = labels.count(data.IGNORE)
        assert labels[:prompt_length] == [data.IGNORE] * prompt_length
        assert labels[prompt_length:] == ids[prompt_length:]  # every response token is learned ...
        assert tokenizer.decode(ids[prompt_length:-1]) == row  # ... the response, then EOS
        assert ids[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(ids[:prompt_length]).endswith("### Response:\n")
        if tokenizer.bos_token_id is not None:
            assert tokenizer.bos_token_id not in ids[1:]  # no BOS mid-sequence
        assert losses.target_count((ids, labels)) == len(ids) - prompt_length


def test_search_tuning_and_recovery_build_the_same_rows(tiny_dirs, tmp_path):
    """The candidates' short tuning and recovery read an Alpaca file into the same rows: blank outputs dropped
    by both (EOS alone is not a response)."""
    source = alpaca_file(tmp_path / "rows.json", [
        {"instruction": "Name a colour.", "input": "", "output": "Blue."},
        {"instruction": "Say nothing.", "input": "", "output": ""},
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
        {"instruction": "Say nothing again.", "input": "", "output": " \n "},
    ])
    loaded = load_model(str(tiny_dirs["llama-gqa"]))
    search = Search(loaded, SearchConfig(targets=[0.2], path_criterion="kl", tune_data=str(source), calib_samples=4,
                                         path_samples=4, path_max_length=32, lora=SMALL), tmp_path / "run")
    rows, record = recovery.alpaca_rows(loaded.tokenizer, str(source), SMALL.max_length)
    assert (record["rows"], record["dropped"]) == (2, 2)
    assert search.tune_rows == rows
    responses = [loaded.tokenizer.decode(ids[labels.count(data.IGNORE) : -1]) for ids, labels in rows]
    assert responses == ["Blue.", "5"]


def test_loss_falls_when_a_tiny_model_overfits_a_few_rows(tiny_dirs):
    loaded = load_model(str(tiny_dirs["llama-gqa"]))
    # at random init the final norm keeps every logit within about ±1.3, so no adapter could bring the loss far
    # below ln(vocab); a larger gain lets the adapters express a memorised answer
    with torch.no_grad():
        loaded.model.model.norm.weight.mul_(10)
    answers = ["Blue sky.", "Red sun.", "Green tree.", "Gold ring."]
    examples = [data.Example(data.alpaca_prompt({"instruction": f"Name colour {i}."}), answer)
                for i, answer in enumerate(answers)]
    rows = data.sft_rows(loaded.tokenizer, examples, 256)
    settings = LoraSettings(rank=8, learning_rate=1e-2, batch_size=4, micro_batch_size=2, max_length=256)
    progress = loop.train(lora.attach_lora(loaded.model, settings, 0), rows, settings, 20, 0,
                            loaded.tokenizer.pad_token_id)
    assert len(progress.losses) == 20
    assert sum(progress.losses[-3:]) / 3 < 0.5 * progress.losses[0]


@pytest.mark.parametrize("family", ["llama-mha", "qwen2"])
def test_activation_checkpointing_trains_the_same_adapters(tiny_dirs, family):
    """Recomputing activations in the backward pass (dropout replayed) gives the adapters plain training gives;
    with either setting the model is left without checkpointing or the embedding hook it adds."""
    trained = []
    for checkpointing in (False, True):
        loaded = load_model(str(tiny_dirs[family]))
        rows, _ = recovery.alpaca_rows(loaded.tokenizer, "alpaca", SMALL.max_length)
        settings = LoraSettings(rank=4, learning_rate=1e-2, batch_size=4, micro_batch_size=2, max_length=256,
                                activation_checkpointing=checkpointing)
        peft_model = lora.attach_lora(loaded.model, settings, 0)
        progress = loop.train(peft_model, rows, settings, 3, 0, loaded.tokenizer.pad_token_id)
        adapters = get_peft_model_state_dict(peft_model, save_embedding_layers=False)
        trained.append((progress.losses, adapters))
        assert not loaded.model.is_activation_checkpointing
        assert not getattr(loaded.model, "_require_grads_hooks", None)
    (plain_losses, plain), (losses, checkpointed) = trained
    assert losses == pytest.approx(plain_losses, rel=1e-5)
    assert plain.keys() == checkpointed.keys() and any(v.abs().max() > 0 for k, v in plain.items() if "lora_B" in k)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-5, rtol=1e-4)


def test_merged_checkpoint_reloads_with_the_tuned_logits(tiny_dirs, tmp_path):
    loaded = load_model(str(tiny_dirs["qwen2"]))
    ids = torch.randint(3, 500, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        original = loaded.model(input_ids=ids).logits
    rows, _ = recovery.alpaca_rows(loaded.tokenizer, "alpaca", SMALL.max_length)
    settings = LoraSettings(rank=4, learning_rate=1e-2, batch_size=4, micro_batch_size=4, max_length=256)
    peft_model = lora.attach_lora(loaded.model, settings, 0)
    loop.train(peft_model, rows, settings, 3, 0, loaded.tokenizer.pad_token_id)
    with torch.no_grad():
        tuned = peft_model(input_ids=ids).logits
    assert (tuned - original).abs().max() > 1e-3  # the adapters changed the model
    save_checkpoint(loaded, peft_model.merge_and_unload(), tmp_path / "merged", {})
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, tuned, atol=1e-5, rtol=0)


class Interrupted(Exception):
    pass


def interrupt_after_first_state(model: str, out: Path, config: FinetuneConfig, monkeypatch) -> Path:
    """Run the fine-tune and kill it once its first resumable state is on disk; returns that state's folder."""
    write = checkpoints.write_json_atomic

    def crash_after_first_state(path, payload):
        write(path, payload)
        raise Interrupted

    monkeypatch.setattr(checkpoints, "write_json_atomic", crash_after_first_state)
    with pytest.raises(Interrupted):
        finetune(model, out, config)
    monkeypatch.undo()
    assert not out.exists()
    step = json.loads((checkpoints.state_dir(out) / "progress.json").read_text())["step"]
    return checkpoints.state_dir(out) / f"step-{step}"


@pytest.mark.parametrize("trainable", ["lora", "full"])
def test_finetune_resumes_bitwise_and_leaves_a_finished_out_alone(tiny_dirs, tmp_path, monkeypatch, trainable):
    model, config = str(tiny_dirs["llama-gqa"]), functools.partial(small, trainable=trainable)
    whole = finetune(model, tmp_path / "whole", config())
    assert whole["steps"] == 4 and len(whole["losses"]) == 4 and whole["resumed_at"] == []
    assert whole["data"]["rows"] + whole["data"]["dropped"] == whole["data"]["examples"] == 999
    saved = load_file(tmp_path / "whole" / "model.safetensors")
    assert whole["merged_sha256"] == [weights_sha256(tmp_path / "whole")] == [provenance.weights_digest(saved)]
    assert not checkpoints.state_dir(tmp_path / "whole").exists()

    state = interrupt_after_first_state(model, tmp_path / "resumed", config(), monkeypatch)
    assert state.name == "step-2"
    # the state holds what trains, beside the optimizer: the adapters, or every weight (the tied embedding once)
    trained = load_file(state / checkpoints.Checkpoints.TRAINED)
    if trainable == "lora":
        assert trained and all(".lora_A." in name or ".lora_B." in name for name in trained)
    else:
        assert trained.keys() == saved.keys()
    assert (state / "optimizer.bin").is_file()
    with pytest.raises(MopError, match="state of another fine-tune"):
        finetune(model, tmp_path / "resumed", config(seed=1))
    resumed = finetune(model, tmp_path / "resumed", config())
    assert resumed["resumed_at"] == [2]
    assert resumed["losses"] == whole["losses"] and resumed["merged_sha256"] == whole["merged_sha256"]
    for name, tensor in load_file(tmp_path / "resumed" / "model.safetensors").items():
        assert torch.equal(tensor, saved[name]), name

    mtime = (tmp_path / "whole" / "mop.json").stat().st_mtime_ns
    assert finetune(model, tmp_path / "whole", config()) == whole
    assert (tmp_path / "whole" / "mop.json").stat().st_mtime_ns == mtime
    with pytest.raises(MopError, match="other settings"):
        finetune(model, tmp_path / "whole", config(seed=1))
    with pytest.raises(MopError, match="not a mop fine-tune"):
        finetune(model, tiny_dirs["mistral"], config())


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_processes_train_the_same_merged_weights(tiny_dirs, tmp_path):
    """`accelerate launch` with two CPU processes (DDP over gloo): both end with bitwise the same weights."""
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), "-m", "mop.cli", "finetune", str(tiny_dirs["llama-mha"]),
               "--out", str(out), "--max-steps", "3", "--batch-size", "4", "--micro-batch-size", "1",
               "--max-length", "256", "--rank", "4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((out / "mop.json").read_text())["finetune"]
    assert record["processes"] == 2 and record["steps"] == 3
    digest = weights_sha256(out)
    assert record["merged_sha256"] == [digest, digest]
    assert digest != weights_sha256(tiny_dirs["llama-mha"])


def test_distillation_loss_is_zero_for_the_teacher_and_falls_with_training(tiny_dirs, tmp_path):
    # a larger final-norm gain makes the random teacher's distributions peaked, so that they are worth matching
    original = load_model(str(tiny_dirs["llama-gqa"]))
    with torch.no_grad():
        original.model.model.norm.weight.mul_(10)
    save_checkpoint(original, original.model, tmp_path / "teacher", {})
    teacher, same = load_model(str(tmp_path / "teacher")), load_model(str(tmp_path / "teacher"))
    texts = text_file(tmp_path / "text.txt", lines=12)
    rows, record = recovery.text_rows(teacher.tokenizer, str(texts), 64)
    assert record["rows"] >= 8 and all(ids == labels for ids, labels in rows)
    batch = loop._batch(rows[:4], teacher.tokenizer.pad_token_id, torch.device("cpu"))
    kd = losses.distillation_sum(teacher.model, temperature=2.0)
    with torch.no_grad():
        assert kd(same.model, batch).item() == pytest.approx(0, abs=1e-6)

    student = same  # the teacher less one layer, written by mop with the teacher as its source
    remove_layer(student.model, student.adapter, 3)
    source = {"source": {"name": str(tmp_path / "teacher"), "sha256": teacher.weights_sha256}, "path": "D"}
    save_checkpoint(student, student.model, tmp_path / "pruned", source)
    with torch.no_grad():
        before = kd(student.model, batch).item()
    config = small(method="kd", kd_data=str(texts), max_steps=16, lora=LoraSettings(
        rank=8, learning_rate=3e-3, batch_size=4, micro_batch_size=4, max_length=64))
    result = finetune(str(tmp_path / "pruned"), tmp_path / "distilled", config)
    assert result["teacher"]["name"] == str(tmp_path / "teacher")  # the source named in mop.json
    assert result["teacher"]["sha256"] == teacher.weights_sha256
    trained = result["losses"]
    assert sum(trained[-4:]) / 4 < 0.5 * sum(trained[:2]) / 2
    written = json.loads((tmp_path / "distilled" / "mop.json").read_text())
    assert written["path"] == "D" and written["finetune"]["method"] == "kd"
    with torch.no_grad():
        after = kd(AutoModelForCausalLM.from_pretrained(tmp_path / "distilled"), batch).item()
    assert after < 0.6 * before


def test_bad_input_is_refused_and_leaves_nothing(tiny_dirs, tmp_path, capsys):
    not_a_model = tmp_path / "empty"
    not_a_model.mkdir()
    wrong_schema = tmp_path / "texts.jsonl"
    wrong_schema.write_text('{"text": "no instruction here"}\n')
    cases = {
        "no config.json": ["finetune", str(not_a_model)],
        "lacks the Alpaca fields": ["finetune", str(tiny_dirs["mistral"]), "--data", str(wrong_schema)],
        "give the teacher": ["finetune", str(tiny_dirs["mistral"]), "--method", "kd"],
        "argument --max-steps: expected an integer >= 1": ["finetune", str(tiny_dirs["mistral"]), "--max-steps", "0"],
        "argument --micro-batch-size: expected an integer >= 1": ["finetune", str(tiny_dirs["mistral"]),
                                                                  "--micro-batch-size", "0"],
    }
    for message, argv in cases.items():
        out = tmp_path / "out"
        assert cli.main(argv + ["--out", str(out)]) == 2, message
        assert message in capsys.readouterr().err
        assert not out.exists() and not checkpoints.state_dir(out).exists()


def test_bf16_recovery_merges_in_fp32_and_rounds_once(tiny_dirs, tmp_path, monkeypatch):
    """Each merged bf16 weight is the bf16 value nearest to W + scale·B@A computed in fp32 (one rounding); an
    in-dtype merge (peft's safe_merge, or adapters held in bf16) rounds the delta to bf16 first and differs."""
    expected, in_dtype = {}, {}
    train = recovery.train

    def train_then_record_merges(peft_model, *args, **kwargs):
        progress = train(peft_model, *args, **kwargs)
        with torch.no_grad():
            for name, module in peft_model.base_model.model.named_modules():
                if isinstance(module, LoraLinear):
                    w, a, b = module.base_layer.weight, module.lora_A["default"].weight, module.lora_B["default"].weight
                    assert w.dtype == torch.bfloat16 and a.dtype == b.dtype == torch.float32
                    expected[f"{name}.weight"] = (w.float() + module.scaling["default"] * (b.float() @ a.float())).bfloat16()
            in_dtype.update(copy.deepcopy(peft_model).merge_and_unload(safe_merge=True).state_dict())
        return progress

    monkeypatch.setattr(recovery, "train", train_then_record_merges)
    settings = LoraSettings(rank=4, learning_rate=1e-2, batch_size=4, micro_batch_size=2, max_length=256)
    out = tmp_path / "bf16"
    record = finetune(str(tiny_dirs["llama-mha"]), out, small(max_steps=1, lora=settings), dtype="bfloat16")
    assert record["merged_sha256"] == [weights_sha256(out)] == [load_model(str(out)).weights_sha256]
    saved = load_file(out / "model.safetensors")
    assert len(expected) == 7 * 6
    for name, weight in expected.items():
        assert torch.equal(saved[name], weight), name
    rounded_twice = sum((in_dtype[name] != weight).sum().item() for name, weight in expected.items())
    assert rounded_twice > 0.001 * sum(weight.numel() for weight in expected.values())
