"""`mop eval`: lm-eval's own tasks build the expected prompts from our local files; accuracy and perplexity equal
independent computations; bad input fails with one line, exit 2 and no output file."""

from __future__ import annotations

import bz2
import json
import math

import datasets
import huggingface_hub
import pytest
import torch
from conftest import SHARED_DATA

from mop import data
from mop.cli import main
from mop.errors import MopError
from mop.evaluation import build_task, evaluate, local_file
from mop.evaluation.tasks import split_hellaswag_context
from mop.models import load_model

ARC_CHALLENGE_RECORDS = [
    {"id": "T-1", "question": {"stem": "Which gas do plants take in for photosynthesis?",
                               "choices": [{"text": "oxygen", "label": "A"}, {"text": "carbon dioxide", "label": "B"},
                                           {"text": "nitrogen", "label": "C"}]}, "answerKey": "B"},
    {"id": "T-2", "question": {"stem": "What is frozen water called?",
                               "choices": [{"text": t, "label": str(i)} for i, t in
                                           enumerate(["ice", "steam", "fog", "dew", "rain"], 1)]}, "answerKey": "1"},
]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on busy cores OpenMP's waiting makes them ~50x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def requests(task, docs: list[int]) -> list[tuple[list[tuple[str, str]], int]]:
    """Per document (indices ascending): the (context, continuation) pairs lm-eval scores, and the gold choice index
    it scores against. lm-eval numbers the selected documents 0, 1, ... in file order."""
    task.build_all_requests(samples=docs)
    pairs, golds = {}, {}
    for instance in task.instances:
        pairs.setdefault(instance.doc_id, []).append(instance.arguments)
        doc = instance.doc  # WinoGrande varies the context: its gold index comes from doc_to_text
        golds[instance.doc_id] = task.doc_to_text(doc) if task.multiple_input else task.doc_to_target(doc)
    assert len(pairs) == len(docs)
    return [(pairs[i], golds[i]) for i in range(len(docs))]


def same_context(context: str, continuations: list[str]) -> list[tuple[str, str]]:
    return [(context, c) for c in continuations]


def write_arc(path, records=ARC_CHALLENGE_RECORDS):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# ---------------------------------------------------------------- prompts, choices and gold, per task


def test_arc_easy_prompts_from_the_local_file():
    task, source = build_task("arc_easy")
    assert source == str((SHARED_DATA / "arc" / "ARC-Easy-Test.jsonl").resolve())
    assert requests(task, [0, 1, 14]) == [
        (same_context("Question: Which statement best explains why photosynthesis is the foundation of most food "
                      "webs?\nAnswer:",
                      [" Sunlight is the source of energy for nearly all ecosystems.",
                       " Most ecosystems are found on land instead of in water.",
                       " Carbon dioxide is more available than other gases.",
                       " The producers in all ecosystems are plants."]), 0),
        (same_context("Question: Which piece of safety equipment is used to keep mold spores from entering the "
                      "respiratory system?\nAnswer:",
                      [" safety goggles", " breathing mask", " rubber gloves", " lead apron"]), 1),
        # answer keys 1-4 instead of A-D
        (same_context("Question: All living and nonliving material is composed of\nAnswer:",
                      [" air", " elements", " water", " soil"]), 1),
    ]


def test_arc_challenge_reads_a_user_file_named_or_under_the_data_dir(tmp_path, monkeypatch):
    expected = [
        (same_context("Question: Which gas do plants take in for photosynthesis?\nAnswer:",
                      [" oxygen", " carbon dioxide", " nitrogen"]), 1),
        (same_context("Question: What is frozen water called?\nAnswer:",
                      [" ice", " steam", " fog", " dew", " rain"]), 0),
    ]
    named = write_arc(tmp_path / "my-arc.jsonl")
    task, source = build_task("arc_challenge", {"arc_challenge": named})
    assert (source, requests(task, [0, 1])) == (str(named), expected)
    assert task.config.dataset_name == "ARC-Challenge"  # lm-eval's own arc_challenge config

    (tmp_path / "arc").mkdir()
    write_arc(tmp_path / "arc" / "ARC-Challenge-Test.jsonl")
    monkeypatch.setenv("MOP_DATA_DIR", str(tmp_path))
    task, source = build_task("arc_challenge")
    assert (source, requests(task, [0, 1])) == (str(tmp_path / "arc" / "ARC-Challenge-Test.jsonl"), expected)


def test_hellaswag_prompts_rebuild_ctx_b_as_lm_eval_capitalizes_it(tmp_path):
    """Three ActivityNet tasks (ctx_b rebuilt, capitalized by lm-eval) and two WikiHow tasks (no ctx_b; lm-eval
    removes a bracketed aside the export kept), from the shared file, bz2-compressed like it."""
    assert local_file("hellaswag").resolve() == (SHARED_DATA / "hellaswag" / "hellaswag_val_full.txt.bz2").resolve()
    with bz2.open(local_file("hellaswag"), "rt", encoding="utf-8") as handle:
        lines = handle.read().split("\n")
    subset = tmp_path / "hellaswag.txt.bz2"
    with bz2.open(subset, "wt", encoding="utf-8") as handle:
        handle.write("".join("\n".join(lines[6 * i : 6 * i + 6]) + "\n" for i in (0, 1, 2, 3243, 3505)))

    task, _ = build_task("hellaswag", {"hellaswag": subset})
    (roof, roof_gold), (jerk, jerk_gold), (canoe, canoe_gold), (fashion, _), (toddler, toddler_gold) = \
        requests(task, [0, 1, 2, 3, 4])
    assert (roof, roof_gold) == (same_context(
        "Roof shingle removal: A man is sitting on a roof. He",
        [" is using wrap to wrap a pair of skis.", " is ripping level tiles off.", " is holding a rubik's cube.",
         " starts pulling up roofing on a roof."]), 3)
    assert (jerk[0][0], jerk_gold) == (
        "Clean and jerk: A lady walks to a barbell. She bends down and grabs the pole. The lady", 3)
    assert canoe[2] == ("Canoeing: Two women in a child are shown in a canoe while a man pulls the canoe while "
                        "standing in the water, with other individuals visible in the background. The child and a "
                        "different man", " sit in a canoe while the man paddles.")
    assert canoe_gold == 2
    assert fashion[0][0].endswith("take art, design, and sewing to familiarize yourself with foundational concepts "
                                  "in fashion.")
    assert toddler[0][0] == ("Family Life: How to entertain a toddler. Ask the toddler what he or she would like to "
                             "do instead of doing what you would like to do.. Visit a site like to find loads of "
                             "creative activities for toddlers and preschoolers.. Choose small, simple games like "
                             "candy land or chutes and ladders.")
    assert toddler_gold == 1


def test_hellaswag_context_split():
    assert split_hellaswag_context("A man is sitting on a roof. he") == ("A man is sitting on a roof.", "he")
    assert split_hellaswag_context("How to x. Do y.") == ("How to x. Do y.", "")
    assert split_hellaswag_context("a fragment only") == ("a fragment only", "")


def test_piqa_prompts_join_the_label_file():
    task, _ = build_task("piqa")
    assert requests(task, [0, 1, 2]) == [
        (same_context("Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:",
                      [" Provide the guinea pig with a cage full of a few inches of bedding made of ripped paper "
                       "strips, you will also need to supply it with a water bottle and a food dish.",
                       " Provide the guinea pig with a cage full of a few inches of bedding made of ripped jeans "
                       "material, you will also need to supply it with a water bottle and a food dish."]), 0),
        (same_context("Question: dresser\nAnswer:",
                      [" replace drawer with bobby pin ", " finish, woodgrain with  bobby pin "]), 1),
        (same_context("Question: To fight Ivan Drago in Rocky for sega master system.\nAnswer:",
                      [" Drago isn't in this game because it was released before Rocky IV.",
                       " You have to defeat Apollo Creed and Clubber Lang first."]), 1),
    ]


def test_winogrande_prompts_fill_the_blank_in_the_context():
    task, _ = build_task("winogrande")
    surgeon = "Sarah was a much better surgeon than Maria so "
    wine = "They were worried the wine would ruin the bed and the blanket, but the "
    assert requests(task, [0, 1, 2]) == [
        ([(surgeon + "Sarah", " always got the easier cases."), (surgeon + "Maria", " always got the easier cases.")],
         1),
        ([(surgeon + "Sarah", " always got the harder cases."), (surgeon + "Maria", " always got the harder cases.")],
         0),
        ([(wine + "blanket", " was't ruined."), (wine + "bed", " was't ruined.")], 1),
    ]


# ---------------------------------------------------------------- scores against independent computations


@torch.no_grad()
def continuation_logprob(model, tokenizer, context: str, continuation: str) -> float:
    """Sum of the log-probabilities of the continuation's tokens given the context."""
    context_ids = tokenizer(context)["input_ids"]
    ids = tokenizer(context + continuation)["input_ids"]
    logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    return sum(logprobs[i - 1, ids[i]].item() for i in range(len(context_ids), len(ids)))


def expected_accuracy(model, tokenizer, docs) -> tuple[float, float]:
    """acc (argmax of log-likelihood) and acc_norm (argmax of log-likelihood per character of the choice) over
    docs of (contexts, choices, gold)."""
    acc = acc_norm = 0
    for contexts, choices, gold in docs:
        scores = [continuation_logprob(model, tokenizer, ctx, " " + choice) for ctx, choice in zip(contexts, choices)]
        acc += max(range(len(scores)), key=scores.__getitem__) == gold
        acc_norm += max(range(len(scores)), key=lambda i: scores[i] / len(choices[i])) == gold
    return acc / len(docs), acc_norm / len(docs)


def test_accuracy_equals_an_independent_computation(tiny_dirs):
    loaded = load_model(str(tiny_dirs["llama-gqa"]))
    n = 8
    record = evaluate(loaded, ["arc_easy", "piqa", "winogrande"], limit=n, batch_size=4)

    arc = [json.loads(line) for line in (SHARED_DATA / "arc" / "ARC-Easy-Test.jsonl").read_text().splitlines()[:n]]
    arc_docs = [([f"Question: {r['question']['stem']}\nAnswer:"] * len(r["question"]["choices"]),
                 [c["text"] for c in r["question"]["choices"]],
                 [c["label"] for c in r["question"]["choices"]].index(r["answerKey"])) for r in arc]
    piqa = [json.loads(line) for line in (SHARED_DATA / "piqa" / "valid.jsonl").read_text().splitlines()[:n]]
    labels = (SHARED_DATA / "piqa" / "valid-labels.lst").read_text().split()
    piqa_docs = [([f"Question: {r['goal']}\nAnswer:"] * 2, [r["sol1"], r["sol2"]], int(label))
                 for r, label in zip(piqa, labels)]
    wino = datasets.Dataset.from_file(str(SHARED_DATA / "winogrande" / "winogrande-validation.arrow")).select(range(n))
    wino_docs = []
    for r in wino:
        blank = r["sentence"].index("_")
        rest = r["sentence"][blank + 1 :].strip()
        wino_docs.append(([r["sentence"][:blank] + r["option1"], r["sentence"][:blank] + r["option2"]], [rest, rest],
                          int(r["answer"]) - 1))

    tasks = record["tasks"]
    for name, docs in (("arc_easy", arc_docs), ("piqa", piqa_docs)):
        acc, acc_norm = expected_accuracy(loaded.model, loaded.tokenizer, docs)
        assert (tasks[name]["acc"], tasks[name]["acc_norm"], tasks[name]["samples"]) == \
            (pytest.approx(acc), pytest.approx(acc_norm), n), name
        assert tasks[name]["acc_stderr"] == pytest.approx(math.sqrt(acc * (1 - acc) / (n - 1)))
    acc, _ = expected_accuracy(loaded.model, loaded.tokenizer, wino_docs)
    assert (tasks["winogrande"]["acc"], tasks["winogrande"]["acc_norm"]) == (pytest.approx(acc), None)
    assert record["average"] == pytest.approx(
        (tasks["arc_easy"]["acc_norm"] + tasks["piqa"]["acc_norm"] + tasks["winogrande"]["acc"]) / 3)
    assert record["average_tasks"] == ["arc_easy", "piqa", "winogrande"]
    assert record["model"]["params"] == sum(p.numel() for p in loaded.model.parameters())


def test_perplexity_equals_exp_mean_nll(tiny_dirs, tmp_path):
    loaded = load_model(str(tiny_dirs["mistral"]))
    lines = (SHARED_DATA / "wikitext2" / "wiki.test.raw").read_text().splitlines()[:60]
    text_file = tmp_path / "wiki.txt"
    text_file.write_text("\n".join(lines))
    record = evaluate(loaded, ["wikitext"], limit=3, ppl_segment_length=32, task_files={"wikitext": text_file})
    result = record["tasks"]["wikitext"]

    # the standard protocol: every row of the split joined by blank lines, the blank rows included
    ids = loaded.tokenizer("\n\n".join(data.wikitext_rows("\n".join(lines))))["input_ids"]
    nll = []
    with torch.no_grad():
        for start in range(0, 3 * 32, 32):
            segment = torch.tensor([ids[start : start + 32]])
            logprobs = torch.log_softmax(loaded.model(segment).logits[0, :-1], -1)
            nll += (-logprobs.gather(-1, segment[0, 1:, None])[:, 0]).tolist()
    assert result["perplexity"] == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-5)
    assert (result["segments"], result["segment_length"], result["tokens_scored"]) == (3, 32, 93)
    assert (record["average"], record["average_tasks"]) == (None, [])
    capped = evaluate(loaded, ["wikitext"], limit=3, ppl_segment_length=32, task_files={"wikitext": text_file},
                      ppl_segments=2)["tasks"]["wikitext"]
    assert (capped["segments"], capped["tokens_scored"]) == (2, 62)


def test_smollm2_arc_accuracy_and_perplexity(smollm2_dir):
    """The real tokenizer (no BOS) through lm-eval's HFLM: the same accuracy as the independent computation, and a
    perplexity in SmolLM2's range."""
    loaded = load_model("smollm2-135m")
    n = 6
    record = evaluate(loaded, ["arc_easy", "wikitext"], limit=n, ppl_segment_length=256)
    arc = [json.loads(line) for line in (SHARED_DATA / "arc" / "ARC-Easy-Test.jsonl").read_text().splitlines()[:n]]
    acc, acc_norm = expected_accuracy(loaded.model, loaded.tokenizer, [
        ([f"Question: {r['question']['stem']}\nAnswer:"] * len(r["question"]["choices"]),
         [c["text"] for c in r["question"]["choices"]],
         [c["label"] for c in r["question"]["choices"]].index(r["answerKey"])) for r in arc])
    assert (record["tasks"]["arc_easy"]["acc"], record["tasks"]["arc_easy"]["acc_norm"]) == \
        (pytest.approx(acc), pytest.approx(acc_norm))
    assert 5 < record["tasks"]["wikitext"]["perplexity"] < 60


def test_cli_writes_the_record(tiny_dirs, tmp_path, capsys):
    out = tmp_path / "eval" / "result.json"
    arc = write_arc(tmp_path / "arc.jsonl")
    assert main(["eval", str(tiny_dirs["qwen2"]), "--tasks", "arc_challenge,wikitext", "--task-file",
                 f"arc_challenge={arc}", "--limit", "2", "--ppl-segment-length", "16", "--output", str(out)]) == 0
    record = json.loads(out.read_text())
    assert list(record["tasks"]) == ["arc_challenge", "wikitext"]
    assert (record["tasks"]["arc_challenge"]["samples"], record["tasks"]["arc_challenge"]["data"]) == (2, str(arc))
    assert record["average"] == record["tasks"]["arc_challenge"]["acc_norm"]
    assert record["tasks"]["wikitext"]["segments"] == 2 and record["limit"] == 2
    assert "arc_challenge" in capsys.readouterr().out
    assert sorted(p.name for p in out.parent.iterdir()) == ["result.json", "result.log"]  # the record, its log


# ---------------------------------------------------------------- bad input


def bad_arc_file(tmp_path):
    path = tmp_path / "not-arc.jsonl"
    path.write_text(json.dumps({"goal": "g", "sol1": "a", "sol2": "b"}) + "\n")
    return path


@pytest.mark.parametrize("case, message", [
    ("unknown task", "unknown task mmlu"),
    ("limit 0", "argument --limit: expected an integer >= 1"),
    ("wrong schema", "record 1 is not an ARC record"),
    ("missing arc_challenge", "$MOP_DATA_DIR/arc/ARC-Challenge-Test.jsonl or pass --task-file arc_challenge=PATH"),
    ("not a model", "is not a model directory"),
])
def test_bad_input_exits_2_and_writes_nothing(case, message, tiny_dirs, tmp_path, monkeypatch, capsys):
    # an unreachable hub, at once (the HF_HUB_OFFLINE variable is read when huggingface_hub is imported)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    model, tasks, extra = str(tiny_dirs["llama-mha"]), "arc_easy", []
    if case == "unknown task":
        tasks = "arc_easy,mmlu"
    elif case == "limit 0":
        extra = ["--limit", "0"]
    elif case == "wrong schema":
        extra = ["--task-file", f"arc_easy={bad_arc_file(tmp_path)}"]
    elif case == "missing arc_challenge":
        tasks = "arc_challenge"
    elif case == "not a model":
        model = str(tmp_path)
    out = tmp_path / "out" / "result.json"
    assert main(["eval", model, "--tasks", tasks, "--output", str(out), *extra]) == 2
    assert message in capsys.readouterr().err
    assert not out.parent.exists() or not any(out.parent.iterdir())


@pytest.mark.parametrize("task, content, message", [
    ("piqa", '{"goal": "g", "sol1": "a"}\n', "is not a PIQA record"),
    ("winogrande", '{"sentence": "no blank", "option1": "a", "option2": "b", "answer": "1"}\n',
     "is not a WinoGrande record"),
    ("hellaswag", "context without label\n0\na\nb\nc\nd\n", "is not a HellaSwag task"),
    ("hellaswag", "a: b\n0\n", "not 6 per task"),
])
def test_wrong_schema_is_one_line(task, content, message, tmp_path):
    path = tmp_path / ("data.txt" if task == "hellaswag" else "data.jsonl")
    path.write_text(content)
    with pytest.raises(MopError, match=message):
        build_task(task, {task: path})


def test_wikitext2_text_is_the_standard_protocol_text():
    """The perplexity text is `"\\n\\n".join(rows)` over all 4,358 rows of wikitext-2-raw-v1 test, blank rows
    included: character for character the split as the provenance copy wrote it (CRLF line endings)."""
    from mop.data import perplexity_text, wikitext_rows

    reference = (SHARED_DATA / "wikitext2" / "provenance" / "rotorquant_wikitext-test.txt").read_bytes()
    assert perplexity_text("wikitext2") == reference.decode("utf-8").replace("\r\n", "\n")
    rows = wikitext_rows((SHARED_DATA / "wikitext2" / "wiki.test.raw").read_text(encoding="utf-8"))
    assert len(rows) == 4358 and rows[0] == "" and rows[1] == " = Robert Boulter = \n"


def test_perplexity_segments_drop_the_tail(tokenizer):
    """numel // L full segments; the shorter tail is not scored (the standard protocol)."""
    from mop.data import text_segments

    text = (SHARED_DATA / "wikitext2" / "wiki.test.raw").read_text()[:5000]
    ids = tokenizer(text)["input_ids"]
    segments = text_segments(tokenizer, text, 100)
    assert len(segments) == len(ids) // 100 and all(len(s) == 100 for s in segments)
    assert torch.equal(torch.cat(segments), torch.tensor(ids[: len(segments) * 100]))
