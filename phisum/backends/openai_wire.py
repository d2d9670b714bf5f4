"""The wire format of OpenAI-compatible servers (vLLM, llama.cpp's llama-server), as pure functions.

phisum.backends.openai_compat sends and reads these; the tests check them without a server.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import httpx

from phisum.backends.base import BackendError
from phisum.generation import GenerationSettings

STYLES = ("vllm", "llamacpp")
# gguf_export names cached files <weights sha256[:16]>-<config hash[:8]>-<folder>.gguf
_CACHE_PREFIX = re.compile(r"^[0-9a-f]{16}-[0-9a-f]{8}-(?=.)")
_LLAMACPP_FIELDS = ["content", "stop_type", "tokens_predicted", "tokens_evaluated", "timings"]
_LLAMACPP_FINISH = {"eos": "eos", "word": "stop", "limit": "length"}


class Reply(NamedTuple):
    text: str
    finish_reason: str  # eos | stop | length | cancelled
    prompt_tokens: int
    new_tokens: int
    timings: dict | None = None  # llama.cpp's prompt/decode timings, where the server gives them


def server_root(base_url: str) -> httpx.URL:
    """`http://host:port`, `.../` and `.../v1` all name the same server: its root URL."""
    try:
        url = httpx.URL(base_url.strip())
    except Exception:  # httpx's own parse errors
        raise BackendError("the server URL cannot be parsed; expected http://HOST:PORT") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise BackendError(f"{display_url(base_url)!r} is not an http(s) URL; expected http://HOST:PORT")
    path = url.path.rstrip("/")
    path = path[:-3] if path.endswith("/v1") else path
    return url.copy_with(path=path or "/", query=None, fragment=None)


def display_url(base_url) -> str:
    """scheme://host:port only: no user info, path or query, which may carry secrets."""
    try:
        url = httpx.URL(str(base_url).strip())
    except Exception:
        return "(unparseable URL)"
    port = f":{url.port}" if url.port else ""
    return f"{url.scheme}://{url.host}{port}" if url.host else "(URL without a host)"


def lora_adapter_name(path: str) -> str:
    """An adapter's name from its GGUF file: the stem, less phisum's cache prefix."""
    return _CACHE_PREFIX.sub("", Path(path).stem)


def parse_vllm_models(body: Mapping, prefer: Iterable[str] = ()) -> tuple[str, dict[str, str], int | None]:
    """(base model id, {adapter name: its root}, max_model_len) from vLLM's `GET /v1/models`.
    LoRA modules are the entries with a `parent`; with several bases, one named in `prefer` wins."""
    cards = [c for c in body.get("data") or [] if isinstance(c, Mapping) and c.get("id")]
    bases = [c for c in cards if not c.get("parent")]
    if not bases:
        raise BackendError("the server lists no base model in /v1/models")
    prefer = set(prefer)
    base = next((c for c in bases if {c["id"], c.get("root")} & prefer), bases[0])
    adapters = {c["id"]: str(c.get("root") or c["id"]) for c in cards if c.get("parent") == base["id"]}
    return base["id"], adapters, base.get("max_model_len")


def completion_payload(style: str, prompt: str, settings: GenerationSettings, stops: Sequence[str],
                       model: str | None = None, lora: list | None = None, stream: bool = False,
                       cache_prompt: bool = False, context_length: int = 2048) -> tuple[str, dict]:
    """(path, JSON body) of one completion request. Every sampling field is sent, so neither the
    server's defaults (llama.cpp: top_k 40, min_p 0.05) nor a model's generation_config (vLLM
    applies it to fields a request leaves out) changes what phisum's settings mean."""
    s = settings
    if style == "vllm":
        body = {"model": model, "prompt": prompt, "max_tokens": s.max_new_tokens, "stop": list(stops),
                "repetition_penalty": float(s.repetition_penalty), "stream": stream}
        body.update({"temperature": float(s.temperature) if s.do_sample else 0.0,
                     "top_p": float(s.top_p) if s.do_sample else 1.0, "top_k": -1, "min_p": 0.0})
        if s.seed is not None:
            body["seed"] = int(s.seed)
        if stream:
            body["stream_options"] = {"include_usage": True}
        return "/v1/completions", body
    if style != "llamacpp":
        raise ValueError(f"unknown server style {style!r}; choose one of {', '.join(STYLES)}")
    body = {"prompt": prompt, "n_predict": s.max_new_tokens, "stop": list(stops), "lora": lora or [],
            "temperature": float(s.temperature) if s.do_sample else 0.0,
            "top_p": float(s.top_p) if s.do_sample else 1.0,
            "top_k": 0, "min_p": 0.0, "typical_p": 1.0,
            # over the whole prompt and output, as transformers' repetition_penalty is (-1 is refused)
            "repeat_penalty": float(s.repetition_penalty), "repeat_last_n": int(context_length),
            "cache_prompt": cache_prompt, "stream": stream}
    if s.seed is not None:
        body["seed"] = int(s.seed)
    if not stream:
        body["response_fields"] = _LLAMACPP_FIELDS  # else it echoes the prompt and every setting back
    return "/completion", body


def vllm_finish_reason(finish_reason, stop_reason) -> str:
    if finish_reason == "length":
        return "length"
    if finish_reason == "abort":
        return "cancelled"
    # stop_reason: None at EOS, the string when a stop string matched, an id for a stop token
    return "stop" if isinstance(stop_reason, str) else "eos"


def parse_completion(style: str, body: Mapping) -> Reply:
    if style == "llamacpp":
        reason = _LLAMACPP_FINISH.get(body.get("stop_type"), "stop")
        return Reply(body.get("content") or "", reason, int(body.get("tokens_evaluated") or 0),
                     int(body.get("tokens_predicted") or 0), body.get("timings"))
    choice = (body.get("choices") or [{}])[0]
    usage = body.get("usage") or {}
    return Reply(choice.get("text") or "", vllm_finish_reason(choice.get("finish_reason"), choice.get("stop_reason")),
                 int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0))


def parse_stream_event(style: str, data: Mapping) -> tuple[str, str | None]:
    """(new text, finish reason once the server says it is done, else None) of one SSE event."""
    if "error" in data:
        raise BackendError(f"the server stopped the stream: {error_text(data)}")
    if style == "llamacpp":
        done = data.get("stop")
        return data.get("content") or "", _LLAMACPP_FINISH.get(data.get("stop_type"), "stop") if done else None
    choices = data.get("choices") or []  # the usage-only event at the end has none
    if not choices:
        return "", None
    choice = choices[0]
    done = choice.get("finish_reason")
    return choice.get("text") or "", vllm_finish_reason(done, choice.get("stop_reason")) if done else None


def error_text(body) -> str:
    """The one-line message of an error body: OpenAI/llama.cpp {"error": {"message"}}, older vLLM
    {"message"}, FastAPI {"detail"}."""
    if isinstance(body, Mapping):
        inner = body.get("error")
        if isinstance(inner, Mapping):
            body = inner
        elif isinstance(inner, str):
            return one_line(inner)
        detail = body.get("detail")
        if isinstance(detail, list) and detail and isinstance(detail[0], Mapping):
            detail = detail[0].get("msg")
        for value in (body.get("message"), detail):
            if value:
                return one_line(str(value))
    return one_line(str(body))


def one_line(text: str, limit: int = 240) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def short_name(name: str | None) -> str | None:
    """A model id as shown: a filesystem path shows its last part only."""
    return Path(name).name if name and name.startswith(("/", "~", ".")) else name
