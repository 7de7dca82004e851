"""How optimistic is the depth repair's own error? For every layer ℓ of dense SmolLM2-135M, the relative error
E‖Δ_ℓ − D h_ℓ−1‖² / E‖x_out‖² of the closed-form depth repair (`mop.pruning.compensation`) fitted on one half of
the 32 WikiText-2 validation calibration prompts (alternate batches of 4) and measured on the same half
(in-sample, what `--layer-criterion repair_error` ranks by) and on the other half (held out), averaged over the
two ways round, at depth ridges 1e-4 (the default) and 1e-2; beside the plain cut's E‖Δ_ℓ‖² / E‖x_out‖².
Writes docs/benchmarks/depth_repair_heldout.md.

    MOP_DATA_DIR=../shared/data python benchmarks/depth_repair_heldout.py
"""

from __future__ import annotations

from pathlib import Path

from mop.models import load_model
from mop.pruning.compensation import _calibration_pass, _DepthMoments
from mop.pruning.search import SearchConfig, calibration_batches

ROOT = Path(__file__).resolve().parents[1]
RIDGES = (1e-4, 1e-2)


def main() -> None:
    loaded = load_model("smollm2-135m")
    model, adapter = loaded.model, loaded.adapter
    batches = calibration_batches(loaded, SearchConfig(targets=[0.2], calib="wikitext2-valid", calib_samples=32))
    halves = [batches[0::2], batches[1::2]]
    layers = adapter.layers(model)
    lines = ["# The depth repair's error, in-sample and held out (SmolLM2-135M, dense)", "",
             "Produced by `MOP_DATA_DIR=../shared/data python benchmarks/depth_repair_heldout.py` (its docstring has "
             "the protocol): relative error E‖Δ − D h‖² / E‖x_out‖² of removing each layer alone, fitted on half "
             "of the 32 calibration prompts and measured on that half (in-sample) or the other (held out).", "",
             "| layer | plain cut | " + " | ".join(f"in-sample, ridge {r:g} | held out, ridge {r:g}" for r in RIDGES)
             + " |", "|---|---|" + "---|---|" * len(RIDGES)]
    for index in range(1, len(layers)):
        moments = []
        for half in halves:
            m = _DepthMoments(layers[index - 1].mlp.down_proj)
            _calibration_pass(model, half, [(m.down, "pre", m.read_h), (layers[index], "post", m.read_update)])
            moments.append(m)
        plain = sum(m.delta_energy / m.out_energy for m in moments) / 2
        cells = []
        for ridge in RIDGES:
            inside = sum(m.fit(ridge)[2] for m in moments) / 2
            outside = sum(test.error(fit.correction(ridge)) for fit, test in (moments, moments[::-1])) / 2
            cells += [f"{inside:.5f}", f"{outside:.5f}"]
        lines.append(f"| {index} | {plain:.5f} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    (ROOT / "docs" / "benchmarks" / "depth_repair_heldout.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
