"""Messages between the frontend and model containers (over ZeroMQ).

Each message is a multipart ZeroMQ message. Its first frame is a small msgpack
array, the header, whose first element is the message type; a batch or an
output block follows as a frame of its own, so numeric data is never pickled
or re-encoded: it travels as the raw bytes of one contiguous numpy buffer.

The frontend binds a ROUTER socket; each container connects a DEALER socket,
so the ROUTER sees one routing identity frame before the header.

Security is ZeroMQ's, below these messages: CURVE on TCP, PLAIN on the
local Unix socket, both checked by the frontend's ZAP handler against the
credentials it issued (``clipper.security.container_keys``); with
``rpc_security = "none"`` (loopback only) there is none. A hello is accepted
only for the model (and version) its credential names; its other fields are
claims, validated and bounded (``clipper.rpc.server.parse_hello``): model and
version names, ``pid`` an integer in 1..2**31-1 (shown, never signalled),
``input_dtype`` one of the application dtypes, ``input_shape`` at most 32
non-negative integers, ``sdk`` at most 128 characters, ``credential_id`` at
most 64 (believed only under ``rpc_security = "none"``), ``load_ms`` (the model's load time) a
number in 0..7 days, ``rss_bytes`` (the container's resident memory at the hello) an integer in 0..2**50. Header frames are
at most 64 KiB; any frame at most ``limits.max_rpc_message_bytes``; a message at most a header and
a payload frame (more are dropped and the message refused).

Container -> frontend::

    C_HELLO      [1, rpc_version, {"model", "version", "pid"?, "input_dtype"?, "input_shape"?, "sdk"?,
                                   "credential_id"?, "load_ms"?, "rss_bytes"?}]
    C_HEARTBEAT  [2]
    C_RESULT     [3, batch_id, count, encoding, meta]  + payload frame
    C_ERROR      [4, batch_id, code, message]
    C_BYE        [5]

Frontend -> container::

    F_WELCOME    [1, replica_id, {"heartbeat_interval_ms", "heartbeat_timeout_ms"}]
    F_BATCH      [2, batch_id, count, encoding, meta]  + payload frame
    F_HEARTBEAT  [3]
    F_REJECT     [4, message]          the container must exit (refused hello, revoked, hung, deleted)
    F_REHELLO    [5]                   unknown sender: say C_HELLO again

Encodings of a batch or an output block:

* ``"nd"``: ``meta = [typestr, shape]``; the payload is the raw C-order bytes
  of an array of that dtype and shape (for a batch, ``shape[0] == count``).
* ``"vl"``, batches of items of different sizes, in one buffer:

  * bytes or str inputs: ``meta = ["bytes" | "str"]``; the payload is
    ``count + 1`` little-endian uint64 offsets followed by the items' bytes,
    item ``i`` being ``data[offsets[i]:offsets[i+1]]`` (a str as UTF-8);
  * arrays whose shape has a free dimension (``-1``): ``meta = ["array",
    typestr, ndim]``; the payload is ``count + 1`` little-endian uint64 byte
    offsets into the data (the first 0, the last the data's length), then
    ``count * ndim`` little-endian uint64 dimensions (item ``i``'s shape is
    ``dims[i*ndim:(i+1)*ndim]``), then the data: item ``i`` is
    ``data[offsets[i]:offsets[i+1]]``, its elements in C order. Each item's
    byte length is ``prod(shape) * itemsize``. The data starts 8-byte aligned
    (the header is whole uint64s) and each item at a multiple of the
    itemsize, so a receiver takes each item as an aligned view
    (``np.frombuffer``), no copy.
* ``"mp"``: ``meta = None``; the payload is a msgpack array of ``count``
  items (numpy arrays inside as EXT_NDARRAY).
"""

RPC_VERSION = 1

C_HELLO = 1
C_HEARTBEAT = 2
C_RESULT = 3
C_ERROR = 4
C_BYE = 5

F_WELCOME = 1
F_BATCH = 2
F_HEARTBEAT = 3
F_REJECT = 4
F_REHELLO = 5

ENC_NDARRAY = "nd"
ENC_MSGPACK = "mp"
ENC_VARLEN = "vl"

# Exit codes of a container process, so a manager can tell why it stopped.
EXIT_OK = 0
EXIT_REJECTED = 2  # the frontend refused the handshake
EXIT_LOAD_FAILED = 3  # the model could not be loaded
EXIT_FRONTEND_LOST = 4  # the frontend went away and --exit-on-frontend-loss was set
