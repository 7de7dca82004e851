"""lm-eval's model wrapper with our own progress bar: one labelled bar per evaluated task, advanced as lm-eval
answers each loglikelihood request, in place of lm-eval's unlabelled or task-blind bars."""

from __future__ import annotations

from lm_eval.api.model import CacheHook
from lm_eval.models.huggingface import HFLM
from tqdm.auto import tqdm


class _Progress(CacheHook):
    """lm-eval calls its cache hook's `add_partial` once per answered request: here, one step of `bar`."""

    def __init__(self, bar: tqdm) -> None:
        super().__init__(None)
        self.bar = bar

    def add_partial(self, attr, req, res) -> None:
        self.bar.update()


class LabelledLM(HFLM):
    """HFLM whose loglikelihood requests (choices × documents of one task) advance a bar labelled `label`."""

    label = "evaluate"

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        with tqdm(total=len(requests), desc=self.label, unit="request") as bar:
            self.set_cache_hook(_Progress(bar))
            try:
                return super().loglikelihood(requests, disable_tqdm=True)
            finally:
                self.set_cache_hook(CacheHook(None))
