"""Incremental detokenization of one sequence's completion, and its stop strings.

Each step decodes only a small window of tokens, never the whole sequence. Two offsets into the completion
tokens (the usual design, as in vLLM and TGI): text is final up to `read_offset`; decoding from
`prefix_offset` (the tokens of the previous delta) gives the context a token's text may depend on. New
text is the window's decode minus the prefix's decode, and is held back while it ends in U+FFFD: a
multi-byte character split across byte-level BPE tokens (Chinese, emoji) is emitted once complete.
The window starts at the first completion token, so the joined text equals decoding the completion
tokens at once for byte-level tokenizers (Qwen's).
"""
from nanovllm.sampling_params import SamplingParams

REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer, params: SamplingParams, num_prompt_tokens: int):
        self.tokenizer = tokenizer
        self.skip_special_tokens = params.skip_special_tokens
        self.stop = params.stop or []
        self.include_stop = params.include_stop_str_in_output
        self.min_tokens = params.min_tokens
        self.start = num_prompt_tokens
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""
        self.num_streamed_chars = 0
        # While streaming, the last characters may begin a stop string that will be cut from the text:
        # hold back len(longest stop) - 1 of them so the streamed text never has to be taken back.
        self.holdback = max(map(len, self.stop)) - 1 if self.stop and not self.include_stop else 0

    def _decode(self, token_ids: list[int], start: int, end: int) -> str:
        if start == end:
            return ""
        return self.tokenizer.decode(token_ids[self.start + start:self.start + end],
                                     skip_special_tokens=self.skip_special_tokens)

    def update(self, token_ids: list[int], finished: bool) -> str | None:
        """Take the sequence's new tokens. token_ids: all its tokens (prompt + completion; only the window
        is read). finished: it ended, so text held for an incomplete character is let out.
        Returns the stop string the text reached, if any (the text is then cut)."""
        end = len(token_ids) - self.start
        prefix = self._decode(token_ids, self.prefix_offset, self.read_offset)
        window = self._decode(token_ids, self.prefix_offset, end)
        if len(window) <= len(prefix) or (window.endswith(REPLACEMENT_CHAR) and not finished):
            return None
        delta = window[len(prefix):]
        self.prefix_offset, self.read_offset = self.read_offset, end
        self.text += delta
        if end < self.min_tokens:  # as vLLM: no stop string ends a sequence before min_tokens
            return None
        return self._find_stop(len(delta))

    def _find_stop(self, delta_len: int) -> str | None:
        # A stop string that ends in the new text may start up to len(stop) - 1 characters before it.
        found = None
        for stop in self.stop:
            at = self.text.find(stop, max(0, len(self.text) - delta_len - len(stop) + 1))
            if at != -1 and (found is None or at < found[0]):
                found = at, stop
        if found is None:
            return None
        at, stop = found
        self.text = self.text[:at + len(stop) if self.include_stop else at]
        return stop

    def stream_delta(self, finished: bool) -> str:
        """Text not streamed yet, less the hold-back while the sequence runs."""
        visible = len(self.text) if finished else max(len(self.text) - self.holdback, self.num_streamed_chars)
        delta = self.text[self.num_streamed_chars:visible]
        self.num_streamed_chars = visible
        return delta
