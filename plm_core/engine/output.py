"""Each sampled token's text and stop decision: eos and stop tokens, stop strings, a finished
grammar, max_tokens and a full context (vLLM's rules, including min_tokens and ignore_eos)."""

from __future__ import annotations

import logging

from plm_core.engine.detokenizer import IncrementalDetokenizer
from plm_core.engine.request import Request, RequestStatus
from plm_core.tokenizer import PLMTokenizer

log = logging.getLogger("plm_core.engine")


class OutputProcessor:
    """Owns one incremental detokenizer per running request."""

    def __init__(self, tokenizer: PLMTokenizer, max_model_len: int):
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self._detok: dict[str, IncrementalDetokenizer] = {}

    def add(self, request: Request) -> None:
        params = request.sampling_params
        self._detok[request.request_id] = IncrementalDetokenizer(
            self.tokenizer,
            skip_special_tokens=params.skip_special_tokens,
            stop=params.stop or [],
            include_stop_str_in_output=params.include_stop_str_in_output,
            prompt_token_ids=request.prompt_token_ids,
            min_tokens=params.min_tokens,
        )

    def remove(self, request_id: str) -> None:
        self._detok.pop(request_id, None)

    def append(self, request: Request, token: int) -> tuple[str, RequestStatus | None]:
        """Appends `token` to the request's output; returns the new text and the finish status
        (None while it goes on). The text of an eos or stop token is not output unless
        include_stop_str_in_output. A finished request's detokenizer is dropped."""
        request.output_token_ids.append(token)
        params = request.sampling_params
        detok = self._detok[request.request_id]
        n_out = len(request.output_token_ids)
        status, text, stop_token = None, "", None
        grammar_done = self._advance_grammar(request, token)
        if n_out >= params.min_tokens and not params.ignore_eos and token in request.eos_token_ids:
            status, stop_token = RequestStatus.FINISHED_STOPPED, token
        elif n_out >= params.min_tokens and token in params.stop_token_ids:
            status, request.stop_reason, stop_token = RequestStatus.FINISHED_STOPPED, token, token
        else:
            text = detok.add(token)
            if detok.stop_reason is not None:
                status, request.stop_reason = RequestStatus.FINISHED_STOPPED, detok.stop_reason
            elif grammar_done:
                status = RequestStatus.FINISHED_STOPPED
            elif n_out >= params.max_tokens or request.num_tokens >= self.max_model_len:
                status = RequestStatus.FINISHED_LENGTH
        if status is not None:
            if detok.stop_reason is None:
                text += detok.flush(stop_token if params.include_stop_str_in_output else None)
            self.remove(request.request_id)
        return text, status

    @staticmethod
    def _advance_grammar(request: Request, token: int) -> bool:
        """Advances the structured-output matcher; True when nothing may follow this token."""
        grammar = request.grammar
        if grammar is None:
            return False
        if not grammar.accept(token):  # only the stop token of a grammar with no way forward
            log.warning(
                "request %s: its structured-output grammar allows no token here; stopping it at "
                "token %d",
                request.request_id,
                token,
            )
            return True
        # complete and closed with a stop token; with ignore_eos or min_tokens the stop token does
        # not end the request by itself, but nothing can follow it
        return bool(grammar.is_terminated)
