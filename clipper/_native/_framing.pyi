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

class IdSet:
    """The request ids awaiting their reply on one connection: a hash set of uint64, O(1) and
    allocation-free while it does not grow."""

    def __init__(self) -> None: ...
    def add(self, key: int) -> bool:
        """Add ``key``; False (nothing changed) when it is held already."""
    def discard(self, key: int) -> bool:
        """Remove ``key``; True when it was held."""
    def __contains__(self, key: object) -> bool: ...
    def __len__(self) -> int: ...
    def clear(self) -> None: ...

def assemble_batch(inputs: list, item_nbytes: int) -> bytearray:
    """Copy each input (exactly ``item_nbytes`` bytes each) once into one buffer."""

def assemble_varlen(inputs: list) -> bytearray:
    """bytes/str inputs as one buffer: ``len(inputs) + 1`` little-endian uint64
    offsets, then the data (str as UTF-8); each input copied once."""

def assemble_arrays(inputs: list, ndim: int) -> bytearray:
    """Arrays of one dtype and ``ndim`` dimensions, any shapes, as one buffer (the ``"vl"`` encoding of
    arrays): ``len(inputs) + 1`` little-endian uint64 byte offsets, each item's shape (``ndim`` uint64
    each), then the data; each item copied once."""

def check_nested(body: bytes | bytearray | memoryview, offset: int, shape: tuple[int, ...], itemsize: int,
                 max_bytes: int, int_app: bool) -> tuple | None:
    """Judge the list input at ``offset`` against an application (``shape``, -1 any length; ``itemsize``;
    ``max_bytes``, max_input_bytes; ``int_app``, no floats) without building it, by docs/protocol.md
    section 4's rules in their order: None when it passes, else ``(verdict, detail)``: 201 too deep (0)
    or ragged (1), 205 too large (the number of values), 203 not a number or a float for ``int_app``
    (a msgpack type byte), 204 another shape (the list's shape), 0 undecidable here."""

def request_head(body: bytes | bytearray | memoryview) -> tuple[int, int, str, int, bool] | None:
    """``(kind, req_id, app, input_offset, input_is_list)`` of a PREDICT/FEEDBACK frame with an
    unsigned integer id and a str app, read from its bytes; None for any other frame."""

def refuse_run(items: list, start: int, app: bytes, max_body: int, tail: bytes, out: bytearray,
               inflight: IdSet | None = None, max_out: int = -1) -> int:
    """From ``items[start]``, append to ``out`` the :func:`error_frame` of each PREDICT body for exactly
    the application ``app`` (UTF-8) of at most ``max_body`` bytes; return the index of the first item
    that is anything else, or whose id ``inflight`` holds (admission refusing a run of frames in one
    pass; a duplicate id is the caller's to refuse), or of the first left once ``out`` holds ``max_out``
    bytes (negative: no bound)."""

def default_run(items: list, start: int, app: bytes, max_body: int, first_qid: int, output_body: bytes,
                extra_body: bytes | None, out: bytearray, inflight: IdSet | None = None,
                max_out: int = -1) -> int:
    """The frames :func:`refuse_run` would take, answered instead with the :func:`result_frame` of each id,
    a query id counting up from ``first_qid``, ``output_body`` (a default output), ``is_default`` true
    and ``extra_body``; returns the index of the first item left."""

def array_input(body: bytes | bytearray | memoryview, offset: int, ext_head: bytes, dtype, shape: tuple[int, ...]):
    """A PREDICT frame ``[1, id, app, x]``'s input as a read-only ndarray over the frame's bytes, when
    ``x`` (at ``offset``) is the ndarray extension of exactly ``dtype`` and ``shape`` (its encoding
    begins with ``ext_head``, ``wire.ndarray_ext_head``) and ends the frame; None otherwise."""

def floats_to_array(items: list, dtype):
    """A flat list of floats and ints as a new 1-D float32/float64 array, converted as numpy converts
    them; None for any other dtype or item (or an int too large for a double)."""

def json_vector(raw: bytes, dtype, n: int):
    """A REST body that is exactly ``{"input": [n JSON numbers]}`` as a new 1-D float32/float64 array
    (each number to the nearest double, then to the dtype); None for anything else."""
def count_objects(body: bytes | bytearray | memoryview, offset: int, limit: int) -> int:
    """How many msgpack objects the object at ``offset`` is made of (``limit + 1`` once past ``limit``; -1 when
    the bytes end first or hold no msgpack type), read without building any."""
