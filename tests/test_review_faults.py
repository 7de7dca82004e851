"""The faults a close read of the code found (issue 29, item 7), each pinned by a test that fails without its fix."""

import json

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from conftest import SHARED_DATA
from mop import data


@pytest.fixture(scope="module")
def sentencepiece_tokenizer() -> PreTrainedTokenizerFast:
    """A LLaMA-2-like tokenizer: BPE over "▁"-marked words, "▁" prepended to the text, <s> first."""
    rows = json.loads((SHARED_DATA / "alpaca" / "alpaca_en_demo.json").read_text())[:200]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    bpe.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    bpe.train_from_iterator([r["instruction"] + "\n" + r["output"] for r in rows],
                            trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"]))
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="</s>")


def test_sft_rows_are_the_joined_text_with_the_prompt_masked(sentencepiece_tokenizer):
    """The learned tokens are those of prompt + response tokenized together: no word-start "▁" on the first
    response token, which the response tokenized on its own would have."""
    tokenizer = sentencepiece_tokenizer
    prompt = data.alpaca_prompt({"instruction": "Say yes."})
    response = "The answer is yes."
    assert tokenizer.convert_ids_to_tokens(tokenizer(response, add_special_tokens=False)["input_ids"])[0] == "▁The"
    (ids, labels), = data.sft_rows(tokenizer, [data.Example(prompt, response)], 512)
    joined = tokenizer(prompt + response)["input_ids"]
    prompt_ids = tokenizer(prompt)["input_ids"]
    assert ids == joined + [tokenizer.eos_token_id]
    assert labels == [data.IGNORE] * len(prompt_ids) + ids[len(prompt_ids):]
    assert tokenizer.convert_ids_to_tokens(labels[len(prompt_ids)]) == "The"
    assert tokenizer.decode(ids[len(prompt_ids):-1]) == response
