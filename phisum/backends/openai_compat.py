"""The openai backend: any OpenAI-compatible server (vLLM, llama.cpp's llama-server) over HTTP.

Two dialects, told apart by `GET /lora-adapters` (only llama-server answers it):

- vllm:     `vllm serve BASE --enable-lora --lora-modules dialogsum=DIR oasst=DIR`; a request
            names the adapter as its `model` (the base by the base model's id); `/v1/completions`
            tells EOS from a stop string by `stop_reason`.
- llamacpp: `llama-server -m BASE.gguf --lora A.gguf --lora B.gguf --lora-init-without-apply`;
            a request sets every adapter's scale (all 0 = base). Its OpenAI route says "stop" for
            both EOS and a stop string, so this dialect uses the native `/completion`, whose
            `stop_type` (eos | word | limit) does tell them apart.

`generate` sends one request per prompt, at most `max_concurrency` at once, and the server
batches what arrives together (continuous batching), so concurrent callers share its slots.
The wire format is in phisum.backends.openai_wire.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from pathlib import Path

import httpx

from phisum.backends.base import Backend, BackendError, gather
from phisum.backends.openai_wire import (STYLES, Reply, completion_payload, display_url, error_text,
                                         lora_adapter_name, one_line, parse_completion, parse_stream_event,
                                         parse_vllm_models, server_root, short_name)
from phisum.generation import BASE, Generation, GenerationSettings, first_stop, held_back
from phisum.profiles import Profile

log = logging.getLogger(__name__)

DEFAULT_CONCURRENCY = 8  # vLLM does not say how many sequences it runs at once; its scheduler queues the rest


# ---------------------------------------------------------------- the backend

class OpenAIBackend(Backend):
    name = "openai"

    def __init__(self, profile: Profile, base_url: str, api_key: str | None = None, style: str = "auto",
                 reason: str = "", timeout: float = 300.0, max_concurrency: int | None = None,
                 expected_adapters: Iterable[str] | None = None, adapter_names: Mapping[str, str] | None = None,
                 cache_prompt: bool = False):
        """Connect and find out what the server serves. `expected_adapters`: names the caller wants;
        those the server lacks go to `missing`. `adapter_names` (llama.cpp: adapter name -> the GGUF
        path the server was given) overrides names read from file names. `cache_prompt` lets llama.cpp
        reuse a slot's KV cache; only for a server known to run without its host-memory prompt cache
        (cache-ram 0), whose entries do not record the LoRA scales they were computed with."""
        super().__init__(profile, reason)
        if style not in ("auto", *STYLES):
            raise BackendError(f"unknown server style {style!r}; choose auto, {', '.join(STYLES)}")
        self.root = server_root(base_url)
        self.url = display_url(str(self.root))
        self.timeout = float(timeout)
        self.cache_prompt = cache_prompt
        self._secret = api_key or None
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = self._new_client(2)
        self._lora_ids: dict[str, int] = {}  # llama.cpp: adapter name -> its id on the server
        self._all_lora_ids: list[int] = []  # every request sets each one's scale: the server keeps no default
        self.slots: int | None = None
        try:
            self.style = self._detect_style() if style == "auto" else style
            self._discover(adapter_names or {})
        except BaseException:
            self._client.close()
            raise
        self.max_concurrency = int(max_concurrency or self.slots or DEFAULT_CONCURRENCY)
        self._client.close()
        self._client = self._new_client(self.max_concurrency)
        for name in expected_adapters or ():
            if name != BASE and name not in self.adapters:
                self.missing[name] = self._how_to_serve(name)

    def _new_client(self, concurrency: int) -> httpx.Client:
        # Room for a second caller's requests, streams and tokenizer calls beside one generate call. Idle
        # connections expire before llama.cpp's 5 s keep-alive does, so none is reused as it closes.
        limits = httpx.Limits(max_connections=2 * concurrency + 4, max_keepalive_connections=2 * concurrency + 4,
                              keepalive_expiry=2.0)
        loopback = self.root.host in ("127.0.0.1", "localhost", "::1")
        return httpx.Client(base_url=str(self.root).rstrip("/"), headers=self._headers, limits=limits,
                            timeout=httpx.Timeout(self.timeout, connect=min(10.0, self.timeout)),
                            trust_env=not loopback)  # a proxy from the environment must not catch loopback

    # ------------------------------------------------------------ discovery
    def _detect_style(self) -> str:
        response = self._send("GET", "/lora-adapters", check=False)
        if response.status_code in (401, 403):
            self._raise_for(response, "/lora-adapters")
        return "llamacpp" if response.status_code == 200 else "vllm"

    def _discover(self, adapter_names: Mapping[str, str]) -> None:
        if self.style == "vllm":
            body = self._json("GET", "/v1/models")
            self.model, served, max_len = parse_vllm_models(body, (self.profile.base_model,
                                                                  *self.profile.base_aliases))
            self._context_length = int(max_len or self.profile.context_length)
            self.adapters = {name: "server" for name in served}
            if not self.profile.accepts_base(self.model):
                log.info("server model %s is not the %s profile's %s: adapters trained on that base may not fit",
                         short_name(self.model), self.profile.name, self.profile.base_model)
            return
        props = self._json("GET", "/props")
        self.slots = int(props.get("total_slots") or 1)
        n_ctx = (props.get("default_generation_settings") or {}).get("n_ctx")
        self._context_length = int(n_ctx or self.profile.context_length)
        self.model = props.get("model_alias") if props.get("model_alias") not in (None, "", "-") \
            else props.get("model_path")
        by_path: dict[str, list[str]] = {}
        for name, path in adapter_names.items():
            by_path.setdefault(str(path), []).append(name)
        for entry in self._json("GET", "/lora-adapters"):
            path = str(entry.get("path", ""))
            self._all_lora_ids.append(int(entry["id"]))
            for name in by_path.get(path) or [lora_adapter_name(path)]:
                if name in self._lora_ids or name == BASE:
                    log.warning("llama.cpp serves %s as %r, a name already taken: not used", Path(path).name, name)
                    continue
                self._lora_ids[name] = int(entry["id"])
                self.adapters[name] = "server"

    def _how_to_serve(self, name: str) -> str:
        if self.style == "vllm":
            return (f"the server at {self.url} does not serve adapter {name!r}; start vLLM with "
                    f"--enable-lora --lora-modules {name}=ADAPTER_DIR")
        return (f"the server at {self.url} does not serve adapter {name!r}; export it with `python -m phisum "
                f"export-gguf --adapter ADAPTER_DIR --out {name}.gguf` and start llama-server with "
                f"--lora {name}.gguf --lora-init-without-apply")

    # ------------------------------------------------------------ HTTP
    def _send(self, method: str, path: str, json_body=None, check: bool = True,
              stream: bool = False) -> httpx.Response:
        # A stream asks for Connection: close, so a socket left mid-stream is never handed to another request.
        request = self._client.build_request(method, path, json=json_body,
                                             headers={"Connection": "close"} if stream else None)
        for attempt in (1, 2):
            try:
                response = self._client.send(request, stream=stream)
                break
            except httpx.RemoteProtocolError:
                # The server closed a kept-alive connection as this request went out: it never saw it.
                if attempt == 2:
                    raise BackendError(f"the server at {self.url} closed the connection on {path}") from None
            except httpx.TimeoutException:
                raise BackendError(f"the server at {self.url} did not answer {path} within "
                                   f"{self.timeout:g} s") from None
            except httpx.HTTPError as exc:
                raise BackendError(f"cannot reach the server at {self.url}: {self._scrub(exc)}") from None
        if check and response.status_code != 200:
            if stream:
                response.read()
                response.close()
            self._raise_for(response, path)
        return response

    def _json(self, method: str, path: str, json_body=None):
        response = self._send(method, path, json_body)
        try:
            return response.json()
        except ValueError:
            raise BackendError(f"the server at {self.url} answered {path} with something other than JSON: "
                               f"{self._scrub(response.text)}") from None

    def _raise_for(self, response: httpx.Response, path: str):
        try:
            message = error_text(response.json())
        except ValueError:
            message = one_line(response.text or response.reason_phrase)
        hint = "; check the API key (PHISUM_API_KEY)" if response.status_code in (401, 403) else ""
        raise BackendError(f"the server at {self.url} answered {path} with HTTP {response.status_code}: "
                           f"{self._scrub(message)}{hint}")

    def _scrub(self, text) -> str:
        text = one_line(str(text))
        return text.replace(self._secret, "***") if self._secret else text

    # ------------------------------------------------------------ queries
    @property
    def context_length(self) -> int:
        return self._context_length

    def describe(self) -> dict:
        info = super().describe()
        info.update(base_url=self.url, style=self.style, server_model=short_name(self.model), slots=self.slots)
        return info

    def tokenize(self, text: str) -> list[int]:
        if self.style == "vllm":
            body = {"model": self.model, "prompt": text, "add_special_tokens": False}
        else:
            body = {"content": text, "add_special": False}
        return [int(t) for t in self._json("POST", "/tokenize", body)["tokens"]]

    def detokenize(self, ids: Sequence[int]) -> str:
        if self.style == "vllm":
            return self._json("POST", "/detokenize", {"model": self.model, "tokens": list(ids)})["prompt"]
        return self._json("POST", "/detokenize", {"tokens": list(ids)})["content"]

    # ------------------------------------------------------------ generation
    def _request(self, prompt: str, system: str, settings: GenerationSettings, stops, stream: bool):
        if self.style == "vllm":
            return completion_payload("vllm", prompt, settings, stops, model=self.model if system == BASE else system,
                                      stream=stream)
        chosen = self._lora_ids.get(system)
        lora = [{"id": i, "scale": 1.0 if i == chosen else 0.0} for i in self._all_lora_ids]
        return completion_payload("llamacpp", prompt, settings, stops, lora=lora, stream=stream,
                                  cache_prompt=self.cache_prompt, context_length=self.context_length)

    def complete(self, prompt: str, system: str, settings: GenerationSettings, stops: Sequence[str] = ()) -> Reply:
        """One request, as the server answers it (llama.cpp's timings included)."""
        path, body = self._request(prompt, system, settings, stops, stream=False)
        return parse_completion(self.style, self._json("POST", path, body))

    def _generate_one(self, prompt, system, settings, stops) -> Generation:
        start = time.perf_counter()
        reply = self.complete(prompt, system, settings, stops)
        seconds = time.perf_counter() - start
        text, reason = reply.text, reply.finish_reason
        cut = first_stop(text, stops)  # servers cut stop strings already; this keeps the contract if one does not
        if cut >= 0:
            text, reason = text[:cut], "stop"
        return Generation(text.strip(), system, reply.prompt_tokens, reply.new_tokens, reason, seconds)

    def generate(self, prompts, systems=BASE, settings=None, stops=(), batch_size=None) -> list[Generation]:
        """At most `max_concurrency` requests of this call in flight; the server batches them with
        whatever else is in flight. Each call bounds only itself, so a long evaluation keeps no more
        than that queued at the server and a click arriving meanwhile waits for a slot, not for the
        evaluation. `batch_size` is not used: the server forms its own batches."""
        return gather(self.generate_as_ready(prompts, systems, settings, stops), len(prompts))

    def generate_as_ready(self, prompts, systems=BASE, settings=None, stops=()):
        """Each request's Generation as the server finishes it (see `generate`)."""
        settings = settings or GenerationSettings()
        systems = self._systems_for(prompts, systems)
        if not prompts:
            return
        pool = ThreadPoolExecutor(min(len(prompts), self.max_concurrency), thread_name_prefix=f"phisum-{self.name}")
        futures = {pool.submit(self._generate_one, prompt, system, settings, tuple(stops)): index
                   for index, (prompt, system) in enumerate(zip(prompts, systems))}
        try:
            for future in as_completed(futures):
                yield [(futures[future], future.result())]
        finally:  # after a failure, rows not yet sent are not sent; those in flight end on their own
            pool.shutdown(wait=False, cancel_futures=True)

    def stream(self, prompt, system, settings, stops=(), cancel=None) -> Iterator[str]:
        self.require(system)
        cancel = cancel or threading.Event()
        path, body = self._request(prompt, system, settings, stops, stream=True)
        text = ""
        with self._open_stream(path, body) as events:
            for data in events:
                # Leaving this block closes the connection: llama.cpp and vLLM then abort the request.
                if cancel.is_set():
                    break
                piece, done = parse_stream_event(self.style, data)
                text += piece
                cut = first_stop(text, stops)
                if cut >= 0:
                    text = text[:cut]
                    break
                if piece:
                    yield (text[:len(text) - held_back(text, stops)] if stops else text).strip()
                if done:
                    break
        yield text.strip()

    @contextmanager
    def _open_stream(self, path: str, body: dict):
        response = self._send("POST", path, body, stream=True)
        try:
            yield self._events(response, path)
        finally:
            response.close()

    def _events(self, response: httpx.Response, path: str) -> Iterator[dict]:
        try:
            for line in response.iter_lines():
                field, _, value = line.partition(":")
                value = value.strip()
                if field not in ("data", "error") or not value:
                    continue  # blank separators, comments, event names
                if value == "[DONE]":
                    return
                data = json.loads(value)
                yield {"error": data} if field == "error" else data
        except httpx.HTTPError as exc:
            raise BackendError(f"the stream from {self.url}{path} broke off: {self._scrub(exc)}") from None
        except ValueError:
            raise BackendError(f"the server at {self.url} sent an event that is not JSON on {path}") from None

    def close(self) -> None:
        self._client.close()
