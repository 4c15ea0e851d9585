"""Outcome classification: every real OOM text in every wrapper real servers use, and nothing
else, counts as `oom` (SPEC "Outcomes, retries, delays"; research/whisper-servers.md)."""

import html
import json
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gatekeeper.policy.classify import (
    CLASSIFY_BODY_LIMIT,
    OomMatcher,
    body_text,
    classify,
)
from gatekeeper.policy.outcomes import AttemptOutcome

BUILTIN = OomMatcher()

# (id, the text as the library produces it, the exception type a Python traceback shows before
# it; "" when the text already starts with the type, as when a server sends "Type: message").
# Texts are the exact ones in research/whisper-servers.md, with the "…" filled in as the
# libraries print them.
OOM_TEXTS: list[tuple[str, str, str]] = [
    (
        "torch>=2.1",
        "CUDA out of memory. Tried to allocate 146.00 MiB. GPU 0 has a total capacity of "
        "8.00 GiB of which 0 bytes is free. Including non-PyTorch memory, this process has "
        "7.99 GiB memory in use. Of the allocated memory 7.20 GiB is allocated by PyTorch, and "
        "120.00 MiB is reserved by PyTorch but unallocated. If reserved but unallocated memory "
        "is large try setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid "
        "fragmentation.  See documentation for Memory Management  "
        "(https://pytorch.org/docs/stable/notes/cuda.html#environment-variables)",
        "torch.OutOfMemoryError",
    ),
    (
        "torch<2.1",
        "CUDA out of memory. Tried to allocate 36.00 MiB (GPU 0; 7.93 GiB total capacity; "
        "7.35 GiB already allocated; 20.56 MiB free; 7.40 GiB reserved in total by PyTorch) "
        "If reserved memory is >> allocated memory try setting max_split_size_mb to avoid "
        "fragmentation.  See documentation for Memory Management and PYTORCH_CUDA_ALLOC_CONF",
        "torch.cuda.OutOfMemoryError",
    ),
    ("torch.OutOfMemoryError-name", "torch.OutOfMemoryError: Allocation on device", ""),
    ("torch.cuda.OutOfMemoryError-name", "torch.cuda.OutOfMemoryError: Allocation on device", ""),
    (
        "cuda-error-oom",
        "CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported at "
        "some other API call, so the stacktrace below might be incorrect.\nFor debugging "
        "consider passing CUDA_LAUNCH_BLOCKING=1.",
        "RuntimeError",
    ),
    (
        "cublas-create",
        "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`",
        "RuntimeError",
    ),
    ("cudnn8", "cuDNN error: CUDNN_STATUS_ALLOC_FAILED", "RuntimeError"),
    (
        "cudnn9-device",
        "cuDNN error: CUDNN_STATUS_INTERNAL_ERROR_DEVICE_ALLOCATION_FAILED",
        "RuntimeError",
    ),
    (
        "cudnn9-host",
        "cuDNN error: CUDNN_STATUS_INTERNAL_ERROR_HOST_ALLOCATION_FAILED",
        "RuntimeError",
    ),
    ("ctranslate2-cuda", "CUDA failed with error out of memory", "RuntimeError"),
    (
        "ctranslate2-cublas",
        "cuBLAS failed with status CUBLAS_STATUS_ALLOC_FAILED",
        "RuntimeError",
    ),
    (
        "ggml-cudamalloc",
        "ggml_backend_cuda_buffer_type_alloc_buffer: allocating 1536.00 MiB on device 0: "
        "cudaMalloc failed: out of memory",
        "RuntimeError",
    ),
    (
        "whisper.cpp-compute-buffer",
        "whisper_init_state: failed to allocate the compute buffer",
        "RuntimeError",
    ),
    (
        "onnxruntime-cuda",
        "CUDA failure 2: out of memory ; GPU=0 ; hostname=gpu-box ; "
        "file=/onnxruntime_src/onnxruntime/core/providers/cuda/cuda_allocator.cc ; line=47 ; "
        "expr=cudaMalloc((void**)&p, size);",
        "onnxruntime.capi.onnxruntime_pybind11_state.Fail",
    ),
    (
        "onnxruntime-arena",
        "[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Non-zero status code returned while "
        "running MatMul node. Name:'/encoder/MatMul' Status Message: "
        "/onnxruntime_src/onnxruntime/core/framework/bfc_arena.cc:376 void* "
        "onnxruntime::BFCArena::AllocateRawInternal(size_t, bool, onnxruntime::Stream*, bool, "
        "onnxruntime::WaitNotificationFn) Failed to allocate memory for requested buffer of "
        "size 2605842432",
        "onnxruntime.capi.onnxruntime_pybind11_state.RuntimeException",
    ),
    # Not in the notes: CUDA enum names as CuPy and Numba print them.
    (
        "cupy-runtime",
        "cudaErrorMemoryAllocation: out of memory",
        "cupy_backends.cuda.api.runtime.CUDARuntimeError",
    ),
    (
        "numba-driver",
        "[2] Call to cuMemAlloc results in CUDA_ERROR_OUT_OF_MEMORY",
        "numba.cuda.cudadrv.driver.CudaAPIError",
    ),
    (
        "python-MemoryError",
        "MemoryError: Unable to allocate 3.00 GiB for an array with shape (805306368,) and "
        "data type float32",
        "",
    ),
    ("pybind-bad_alloc", "std::bad_alloc", "MemoryError"),
    (
        "cpp-terminate-bad_alloc",
        "terminate called after throwing an instance of 'std::bad_alloc'\n  what():  "
        "std::bad_alloc",
        "RuntimeError",
    ),
]

# Texts that look like GPU or server trouble but are not out of memory.
LOOK_ALIKES: list[tuple[str, str, str]] = [
    (
        "illegal-memory-access",
        "CUDA error: an illegal memory access was encountered\nCUDA kernel errors might be "
        "asynchronously reported at some other API call, so the stacktrace below might be "
        "incorrect.\nFor debugging consider passing CUDA_LAUNCH_BLOCKING=1.\nCompile with "
        "`TORCH_USE_CUDA_DSA` to enable device-side assertions.",
        "RuntimeError",
    ),
    (
        "device-side-assert",
        "CUDA error: device-side assert triggered\nCompile with `TORCH_USE_CUDA_DSA` to enable "
        "device-side assertions.",
        "RuntimeError",
    ),
    (
        "decode-audio",
        "Failed to decode audio. The file might be corrupted or in an unsupported format.",
        "ValueError",
    ),
    ("internal-server-error", "Internal Server Error", "RuntimeError"),
    ("whisper.cpp-process", "failed to process audio", "RuntimeError"),
    ("not-a-MemoryError", "NoMemoryErrorHandler configured", "RuntimeError"),
]

Body = tuple[bytes, str | None]


def _traceback(text: str, exc_type: str) -> str:
    """A Python traceback as uvicorn logs it and debug pages show it: the error on the last line."""
    last_line = f"{exc_type}: {text}" if exc_type else text
    return (
        "Traceback (most recent call last):\n"
        '  File "/app/app/webservice.py", line 91, in asr\n'
        "    result = asr_model.transcribe(load_audio(audio_file.file, encode), task, language)\n"
        '  File "/usr/local/lib/python3.10/site-packages/torch/nn/modules/module.py", '
        "line 1501, in _call_impl\n"
        "    return forward_call(*args, **kwargs)\n"
        f"{last_line}\n"
    )


def _json(document: object, *, ensure_ascii: bool = False) -> Body:
    return (
        json.dumps(document, ensure_ascii=ensure_ascii).encode(),
        "application/json",
    )


def _html_page(text: str, exc_type: str) -> Body:
    page = (
        "<!DOCTYPE html>\n<html><head><title>500 Internal Server Error</title></head>\n"
        "<body><h1>Internal Server Error</h1>\n"
        f'<pre class="traceback">{html.escape(_traceback(text, exc_type))}</pre>\n'
        "</body></html>\n"
    )
    return page.encode(), "text/html; charset=utf-8"


# How each server wraps an error text (research/whisper-servers.md, "error shapes").
CONTAINERS: list[tuple[str, Callable[[str, str], Body]]] = [
    ("plain", lambda t, e: (t.encode(), "text/plain; charset=utf-8")),
    ("traceback", lambda t, e: (_traceback(t, e).encode(), "text/plain")),
    ("detail", lambda t, e: _json({"detail": t})),
    ("detail-no-content-type", lambda t, e: (_json({"detail": t})[0], None)),
    ("detail-traceback", lambda t, e: _json({"detail": _traceback(t, e)})),
    (
        "error.message-vllm",
        lambda t, e: _json({"error": {"message": t, "type": "InternalServerError"}}),
    ),
    ("error.message-localai", lambda t, e: _json({"error": {"code": 500, "message": t}})),
    (
        "object-error-vllm-old",
        lambda t, e: _json({"object": "error", "message": t, "type": "InternalServerError"}),
    ),
    ("error-whisper.cpp", lambda t, e: _json({"error": t})),
    (
        "whisper.cpp-exception",
        lambda t, e: (f"Internal Server Error\n{t}".encode(), "text/plain"),
    ),
    ("html-page", _html_page),
    ("json-chinese", lambda t, e: _json({"detail": f"转写失败：{t}。请稍后重试"})),
    (
        "json-chinese-ascii",
        lambda t, e: _json({"detail": f"转写失败：{t}。请稍后重试"}, ensure_ascii=True),
    ),
]


def _cases(texts: list[tuple[str, str, str]]) -> list[object]:
    return [
        pytest.param(wrap(text, exc_type), id=f"{text_id}-in-{container_id}")
        for text_id, text, exc_type in texts
        for container_id, wrap in CONTAINERS
    ]


def _body(text: str) -> Body:
    return text.encode(), "text/plain"


@pytest.mark.parametrize("status", [500, 503])
@pytest.mark.parametrize("wrapped", _cases(OOM_TEXTS))
def test_oom_text_in_any_wrapper_is_oom(wrapped: Body, status: int) -> None:
    """A 5xx whose body carries a real OOM text, however the server wrapped it, is `oom`."""
    body, content_type = wrapped
    outcome = classify(status=status, body=body, content_type=content_type, matcher=BUILTIN)
    assert outcome is AttemptOutcome.OOM


@pytest.mark.parametrize("status", [500, 503])
@pytest.mark.parametrize("wrapped", _cases(LOOK_ALIKES))
def test_look_alike_is_error(wrapped: Body, status: int) -> None:
    """A 5xx that is not out of memory (illegal access, assert, bad audio, bare 500) is `error`."""
    body, content_type = wrapped
    outcome = classify(status=status, body=body, content_type=content_type, matcher=BUILTIN)
    assert outcome is AttemptOutcome.ERROR


OOM_BODY = _body("CUDA out of memory. Tried to allocate 146.00 MiB.")


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        pytest.param(200, AttemptOutcome.OK, id="200"),
        pytest.param(204, AttemptOutcome.OK, id="204"),
        pytest.param(302, AttemptOutcome.OK, id="302"),
        pytest.param(400, AttemptOutcome.CLIENT_ERROR, id="400"),
        pytest.param(413, AttemptOutcome.CLIENT_ERROR, id="413"),
        pytest.param(422, AttemptOutcome.CLIENT_ERROR, id="422"),
        pytest.param(499, AttemptOutcome.CLIENT_ERROR, id="499"),
        pytest.param(500, AttemptOutcome.OOM, id="500"),
        pytest.param(507, AttemptOutcome.OOM, id="507"),
        pytest.param(599, AttemptOutcome.OOM, id="599"),
    ],
)
def test_status_decides_before_the_body(status: int, expected: AttemptOutcome) -> None:
    """The OOM text only counts on a 5xx: a 2xx/3xx is `ok` and a 4xx is `client_error`."""
    body, content_type = OOM_BODY
    outcome = classify(status=status, body=body, content_type=content_type, matcher=BUILTIN)
    assert outcome is expected


@pytest.mark.parametrize(
    ("status", "error", "timed_out", "expected"),
    [
        pytest.param(None, None, True, AttemptOutcome.TIMEOUT, id="timeout"),
        pytest.param(500, None, True, AttemptOutcome.TIMEOUT, id="timeout-beats-status"),
        pytest.param(
            None,
            ConnectionResetError(104, "reset"),
            True,
            AttemptOutcome.TIMEOUT,
            id="timeout-beats-error",
        ),
        pytest.param(
            None,
            ConnectionRefusedError(111, "refused"),
            False,
            AttemptOutcome.CRASH,
            id="refused",
        ),
        pytest.param(
            None, ConnectionResetError(104, "reset"), False, AttemptOutcome.CRASH, id="reset"
        ),
        pytest.param(None, EOFError("closed"), False, AttemptOutcome.CRASH, id="closed"),
        pytest.param(
            200,
            ConnectionResetError(104, "reset"),
            False,
            AttemptOutcome.CRASH,
            id="incomplete-body-after-status",
        ),
        pytest.param(None, None, False, AttemptOutcome.CRASH, id="no-response"),
    ],
)
def test_no_full_response(
    status: int | None, error: BaseException | None, timed_out: bool, expected: AttemptOutcome
) -> None:
    """A timeout is `timeout`; any exception or a missing status means no full answer: `crash`."""
    body, content_type = OOM_BODY
    outcome = classify(
        status=status,
        body=body,
        content_type=content_type,
        error=error,
        timed_out=timed_out,
        matcher=BUILTIN,
    )
    assert outcome is expected


OOM_LINE = b"CUDA out of memory"


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        pytest.param(
            b" " * (CLASSIFY_BODY_LIMIT - len(OOM_LINE)) + OOM_LINE,
            AttemptOutcome.OOM,
            id="ends-exactly-at-limit",
        ),
        pytest.param(
            b" " * (CLASSIFY_BODY_LIMIT - len(OOM_LINE) + 1) + OOM_LINE,
            AttemptOutcome.ERROR,
            id="straddles-limit",
        ),
        pytest.param(b" " * CLASSIFY_BODY_LIMIT + OOM_LINE, AttemptOutcome.ERROR, id="beyond"),
    ],
)
def test_only_the_first_limit_bytes_are_inspected(body: bytes, expected: AttemptOutcome) -> None:
    """An OOM text that lies (even partly) past CLASSIFY_BODY_LIMIT is not seen."""
    assert classify(status=500, body=body, content_type="text/plain", matcher=BUILTIN) is expected


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        pytest.param(
            b'{"detail": "\\u0043\\u0055\\u0044\\u0041 out of\\nmemory"}',
            "application/json",
            id="json-escapes-inside-the-words",
        ),
        pytest.param(
            "转写失败：CUDA out of memory".encode("gbk"),
            "text/plain; charset=GBK",
            id="declared-charset-gbk",
        ),
        pytest.param(
            "CUDA out of memory".encode("utf-16"),
            'text/plain; charset="utf-16"',
            id="declared-charset-utf16-quoted",
        ),
        pytest.param(
            b"CUDA out of memory", "text/plain; charset=no-such-codec", id="unknown-charset"
        ),
        pytest.param(b"CUDA out of memory", "text/plain; charset=hex", id="non-text-codec"),
        pytest.param(
            b"<p>CUDA&nbsp;out&#32;of&#x20;memory</p>",
            "text/html",
            id="html-entities-between-words",
        ),
        pytest.param(b"\xef\xbb\xbf" + _json({"detail": "MemoryError"})[0], None, id="utf8-bom"),
        pytest.param("显存不足CUDA out of memory".encode(), "text/plain", id="cjk-glued-to-word"),
        pytest.param(b"cuda OUT OF MEMORY", "text/plain", id="case-insensitive"),
    ],
)
def test_body_text_reveals_hidden_oom(body: bytes, content_type: str | None) -> None:
    """Escapes, declared charsets, entities and odd casing do not hide an OOM message."""
    assert classify(status=500, body=body, content_type=content_type, matcher=BUILTIN) is (
        AttemptOutcome.OOM
    )


@pytest.mark.parametrize(
    ("extra", "body", "expected"),
    [
        pytest.param((), _body("Internal Server Error"), AttemptOutcome.ERROR, id="builtin-only"),
        pytest.param(
            ("^Internal Server Error$",),
            _body("Internal Server Error"),
            AttemptOutcome.OOM,
            id="bare-body",
        ),
        pytest.param(
            ("^Internal Server Error$",),
            _body("Internal Server Error\n"),
            AttemptOutcome.OOM,
            id="bare-body-newline",
        ),
        pytest.param(
            ("^Internal Server Error$",),
            _body(_traceback("500: Internal Server Error while transcribing", "HTTPException")),
            AttemptOutcome.ERROR,
            id="traceback-mid-line",
        ),
        pytest.param(
            ("(?i)gpu is full",),
            _body("Oops: GPU IS FULL"),
            AttemptOutcome.OOM,
            id="inline-flags",
        ),
        pytest.param(
            ("gpu is full", "^Internal Server Error$"),
            _body("Internal Server Error"),
            AttemptOutcome.OOM,
            id="second-pattern",
        ),
    ],
)
def test_operator_patterns(extra: tuple[str, ...], body: Body, expected: AttemptOutcome) -> None:
    """Operator patterns add to the built-ins and `^…$` anchors to a whole line of the body."""
    matcher = OomMatcher.from_patterns(extra)
    outcome = classify(status=500, body=body[0], content_type=body[1], matcher=matcher)
    assert outcome is expected
    assert matcher.extra_patterns == extra


@pytest.mark.parametrize(
    ("pattern", "detail"),
    [
        pytest.param("CUDA (out of memory", "missing )", id="unbalanced"),
        pytest.param("*OOM", "nothing to repeat", id="nothing-to-repeat"),
        pytest.param("", "blank", id="empty"),
        pytest.param("   ", "blank", id="blank"),
    ],
)
def test_bad_operator_pattern_is_rejected(pattern: str, detail: str) -> None:
    """An operator pattern that does not compile (or is blank) raises a ValueError naming it."""
    with pytest.raises(ValueError, match="invalid OOM pattern") as caught:
        OomMatcher.from_patterns(["CUDA out of memory", pattern])
    assert repr(pattern) in str(caught.value)
    assert detail in str(caught.value)


def test_a_str_is_not_a_pattern_list() -> None:
    """One string instead of a collection is a programming error, not one pattern per char."""
    with pytest.raises(TypeError):
        OomMatcher.from_patterns("^Internal Server Error$")


def test_body_text_appends_json_strings_and_unescaped_html() -> None:
    """The raw text comes first, followed by decoded JSON strings and unescaped HTML."""
    json_text = body_text(b'{"a": ["\\u00e9t\\u00e9", {"b": "x\\"y"}], "n": 1}', None)
    assert json_text.splitlines() == [
        '{"a": ["\\u00e9t\\u00e9", {"b": "x\\"y"}], "n": 1}',
        "été",
        'x"y',
    ]
    assert body_text(b"<p>&quot;a&amp;b&quot;</p>", "text/html").splitlines() == [
        "<p>&quot;a&amp;b&quot;</p>",
        '<p>"a&b"</p>',
    ]


def test_hostile_json_nesting_does_not_raise() -> None:
    """JSON nested deeper than the recursion limit is treated as plain text."""
    deep = b"[" * 50_000 + b'"CUDA out of memory"' + b"]" * 50_000
    assert classify(status=500, body=deep, matcher=BUILTIN) is AttemptOutcome.OOM


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4)
    ),
    max_leaves=20,
)
_bodies = st.binary(max_size=2048) | _json_values.map(lambda v: json.dumps(v).encode())
_content_types = (
    st.none()
    | st.text(max_size=40)
    | st.sampled_from(
        [
            "application/json",
            "text/html; charset=utf-8",
            "text/plain; charset=utf-16",
            "text/plain; charset=hex",
            "text/plain; charset=rot13",
            "text/plain; charset=idna",
            "text/plain; charset=",
            'text/plain; charset="',
            "text/plain; charset=unknown",
        ]
    )
)
_errors = st.none() | st.sampled_from([ConnectionResetError(), EOFError(), OSError()])


@given(
    status=st.none() | st.integers(min_value=-1000, max_value=2000),
    body=_bodies,
    content_type=_content_types,
    error=_errors,
    timed_out=st.booleans(),
)
def test_classify_never_raises(
    status: int | None,
    body: bytes,
    content_type: str | None,
    error: BaseException | None,
    timed_out: bool,
) -> None:
    """Whatever an upstream sends, classification returns an outcome instead of raising."""
    outcome = classify(
        status=status,
        body=body,
        content_type=content_type,
        error=error,
        timed_out=timed_out,
        matcher=BUILTIN,
    )
    assert isinstance(outcome, AttemptOutcome)
