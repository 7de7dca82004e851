"""Do a real pruned checkpoint and a random-weight checkpoint of the same shape time alike in vLLM, and does an
MLP width that is not a multiple of 64 cost more? Served side by side in one vLLM process (`time_in_vllm`: 6
runs, first 2 discarded, alternating, 12-token prompt, 128 tokens): the dense model, two equal-speed study
checkpoints (width-only at 1.6x, MLP 152 wide; LLM-Pruner at 1.25x, H6/KV2 I983), a random-weight checkpoint of
each one's shape, and one of LLM-Pruner's shape with I1024; beside the vLLM latency model's predictions (this
machine's cached fit). Needs the checkpoints of `benchmarks/study_speed.py` and a quiet machine; prints its table.

    MOP_DATA_DIR=../shared/data python benchmarks/latency_vllm_same_shape.py
"""
import json
import statistics
import tempfile
from dataclasses import replace
from pathlib import Path

from transformers import AutoConfig, AutoTokenizer

from mop.latency.model import LatencyModel, checkpoint_shape, config_shape, synthetic_model
from mop.latency.protocol import LatencySettings, fixed_prompt
from mop.latency.vllm_bench import time_in_vllm
from mop.models.loading import resolve_model_dir

ROOT = Path(__file__).resolve().parents[1]

dense_dir = resolve_model_dir("smollm2-135m")
config = AutoConfig.from_pretrained(dense_dir)
tok = AutoTokenizer.from_pretrained(dense_dir)
dense = config_shape(config)
real = {"width160": str(ROOT / "runs/speed/width/speedup-160"), "llmp125": str(ROOT / "runs/speed/llm-pruner/speedup-125")}
model = LatencyModel.from_record(json.loads((ROOT / "docs/study/speed/latency_model_vllm.json").read_text()))
settings = LatencySettings(runs=6, warmup=2, time_generate=False)
prompt = fixed_prompt(tok, settings.prompt_tokens)[0].tolist()
with tempfile.TemporaryDirectory() as work:
    dirs = {"dense": dense_dir}
    shapes = {"dense": dense}
    for name, d in real.items():
        dirs[name] = Path(d); shapes[name] = checkpoint_shape(d)
        s = shapes[name]
        dirs[name + "-random"] = Path(work) / (name + "-random")
        synthetic_model(config, s, "cpu", "float32").save_pretrained(dirs[name + "-random"]); tok.save_pretrained(dirs[name + "-random"])
        shapes[name + "-random"] = s
    s = replace(shapes["llmp125"], intermediate=1024)
    dirs["llmp125-I1024-random"] = Path(work) / "a"; shapes["llmp125-I1024-random"] = s
    synthetic_model(config, s, "cpu", "float32").save_pretrained(dirs["llmp125-I1024-random"]); tok.save_pretrained(dirs["llmp125-I1024-random"])
    raw = time_in_vllm(dirs, prompt, settings, "float32")["raw"]
k = settings.warmup
de = statistics.fmean(raw["dense"]["end_to_end_s"][k:])
for role, r in raw.items():
    e = statistics.fmean(r["end_to_end_s"][k:]); f = statistics.fmean(r["first_token_s"][k:])
    dec = statistics.fmean([(a - b) / 127 for a, b in zip(r["end_to_end_s"][k:], r["first_token_s"][k:])])
    print(f"{role:24s} {shapes[role].label():22s} e2e {e:.3f}s first {1000*f:.1f}ms decode {1000*dec:.2f}ms "
          f"speedup {de/e:.3f} predicted {model.speedup(dense, shapes[role]):.3f} pred decode {1000*model.decode_seconds(shapes[role]):.2f}")
print(json.dumps({r: {q: [round(x, 4) for x in v] for q, v in raw[r].items() if v} for r in raw}))
