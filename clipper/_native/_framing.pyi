"""Stream framing and batch assembly (Cython; pure twin in framing_py.py)."""

class FrameReader:
    """Split a byte stream of 4-byte big-endian length-prefixed frames.

    ``feed`` returns one item per frame completed by ``data``: the body
    (``bytes`` or a ``memoryview`` onto ``data``, valid as long as ``data``),
    or for a frame longer than ``max_frame_bytes`` its declared length as an
    ``int``; such a body is skipped without being buffered.
    """

    max_frame_bytes: int  # settable: the server lowers it to the largest request its applications take
    skipped: int  # bytes of oversized frames skipped so far
    def __init__(self, max_frame_bytes: int) -> None: ...
    @property
    def buffered(self) -> int:
        """Bytes held for an incomplete frame (its header or body so far): what the
        stream costs in memory. The msgpack port charges it to ``max_partial_frame_bytes``."""
    @property
    def mid_frame(self) -> bool:
        """True between a frame's first byte and its last (also while an oversized
        body is skipped): the msgpack port's ``header_timeout_ms`` runs meanwhile."""
    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes | memoryview | int]: ...

def pack_frame(body: bytes | bytearray | memoryview) -> bytes:
    """``body`` prefixed with its 4-byte big-endian length (one copy)."""

def result_frame(req_id: int, query_id: int, output_body: bytes, is_default: bool,
                 extra_body: bytes | None) -> bytes:
    """The frame of ``[65, req_id, query_id, output, is_default, extra?]`` from the
    msgpack-encoded ``output_body`` and ``extra_body`` (None: no extra)."""

def error_frame(req_id: int, tail: bytes) -> bytes:
    """The frame of ``[127, req_id, code, name, message]`` from ``tail``, the msgpack encodings of
    code, name and message concatenated (encoded once, spliced per request)."""

def assemble_batch(inputs: list, item_nbytes: int) -> bytearray:
    """Copy each input (exactly ``item_nbytes`` bytes each) once into one buffer."""

def assemble_varlen(inputs: list) -> bytearray:
    """bytes/str inputs as one buffer: ``len(inputs) + 1`` little-endian uint64
    offsets, then the data (str as UTF-8); each input copied once."""

def check_nested(body: bytes | bytearray | memoryview, offset: int, shape: tuple[int, ...]) -> tuple | None:
    """Check the msgpack value at ``offset`` against ``shape`` without building it: None when it is
    nested arrays of exactly that shape with number (or bool) leaves, else ``(kind, depth, got, want)``
    (1 wrong length, 2 not an array, 3 a non-number leaf (``got``: its msgpack type byte), 4 undecidable
    here, 5 a list or map where a number is expected)."""

def request_head(body: bytes | bytearray | memoryview) -> tuple[int, int, str, int, bool] | None:
    """``(kind, req_id, app, input_offset, input_is_list)`` of a PREDICT/FEEDBACK frame with an
    unsigned integer id and a str app, read from its bytes; None for any other frame."""

def refuse_run(items: list, start: int, app: bytes, max_body: int, tail: bytes, out: bytearray) -> int:
    """From ``items[start]``, append to ``out`` the :func:`error_frame` of each PREDICT body for exactly
    the application ``app`` (UTF-8) of at most ``max_body`` bytes; return the index of the first item
    that is anything else (admission refusing a run of frames in one pass)."""

def array_input(body: bytes | bytearray | memoryview, offset: int, ext_head: bytes, dtype, shape: tuple[int, ...]):
    """A PREDICT frame ``[1, id, app, x]``'s input as a read-only ndarray over the frame's bytes, when
    ``x`` (at ``offset``) is the ndarray extension of exactly ``dtype`` and ``shape`` (its encoding
    begins with ``ext_head``, ``wire.ndarray_ext_head``) and ends the frame; None otherwise."""

def floats_to_array(items: list, dtype):
    """A flat list of floats and ints as a new 1-D float32/float64 array, converted as numpy converts
    them; None for any other dtype or item (or an int too large for a double)."""
