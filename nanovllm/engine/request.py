"""A request as the user sees it: one prompt and its n samples (sequences), turned into the output dict
and into stream events."""
from nanovllm.engine.detokenizer import IncrementalDetokenizer
from nanovllm.engine.sequence import Sequence


class Request:
    def __init__(self, index: int, seqs: list[Sequence], tokenizer, incremental: bool):
        """incremental: detokenize every sample step by step (streaming); otherwise only samples with stop
        strings are, and the rest are decoded once at the end."""
        self.index = index
        self.seqs = seqs
        self.tokenizer = tokenizer
        params = seqs[0].sampling_params
        self.detokenizers = [IncrementalDetokenizer(tokenizer, params, seq.num_prompt_tokens)
                             if incremental or params.stop else None for seq in seqs]
        self.num_streamed_tokens = [0] * len(seqs)
        self.reported_finished = [False] * len(seqs)

    def _text(self, i: int) -> str:
        if self.detokenizers[i] is not None:
            return self.detokenizers[i].text
        seq = self.seqs[i]
        return self.tokenizer.decode(seq.completion_token_ids,
                                     skip_special_tokens=seq.sampling_params.skip_special_tokens)

    def _completion(self, i: int) -> dict:
        seq = self.seqs[i]
        return {
            "text": self._text(i),
            "token_ids": seq.completion_token_ids,
            "finish_reason": seq.finish_reason,
            "stop_reason": seq.stop_reason,
            "num_cached_tokens": seq.num_cached_tokens,
            "logprobs": seq.logprobs if seq.sampling_params.logprobs is not None else None,
        }

    def output(self) -> dict:
        """The first sample's fields at the top level (so n = 1 reads out["text"]), all n in "outputs"."""
        completions = [self._completion(i) for i in range(len(self.seqs))]
        return {**completions[0], "prompt_token_ids": self.seqs[0].prompt_token_ids, "outputs": completions}

    def stream_events(self) -> list[dict]:
        """What each sample produced since the last call; a sample's last event has finished=True."""
        events = []
        for i, seq in enumerate(self.seqs):
            if self.reported_finished[i]:
                continue
            finished = seq.is_finished
            start = self.num_streamed_tokens[i]
            token_ids = seq.token_ids[seq.num_prompt_tokens + start:]
            text = self.detokenizers[i].stream_delta(finished)
            if not (token_ids or text or finished):
                continue
            self.num_streamed_tokens[i] += len(token_ids)
            self.reported_finished[i] = finished
            logprobs = seq.logprobs[start:] if seq.sampling_params.logprobs is not None else None
            events.append({"index": self.index, "sample_index": i, "text": text, "token_ids": token_ids,
                           "logprobs": logprobs, "finished": finished,
                           "finish_reason": seq.finish_reason if finished else None,
                           "stop_reason": seq.stop_reason if finished else None})
        return events
