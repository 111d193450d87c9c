"""What the Triton launchers of prune.py and rows.py share: the triton import, availability,
the launch split (programs per batch row), the launch guard, and the test overrides.

Launch guard. A Triton launch runs on the *current* CUDA device and its current stream, whatever
device the tensors live on. `launch_guard(device)` makes the tensors' device current for the
launch (torch.cuda.device), so a launch on cuda:1 while cuda:0 is current runs on cuda:1, on that
device's current stream (a `torch.cuda.stream(s)` context of the caller is honoured). CPU tensors
run under the interpreter (TRITON_INTERPRET=1), which keeps the launch grid and program ids in
process-global state: two threads launching at once corrupt each other ("x >= grid_dim[0]"), so
interpreted launches take a process-wide lock. GPU launches never take it.
"""
import functools
import os
import threading
from typing import Callable, Optional, Tuple

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

try:
    import triton
    import triton.language as tl
    IMPORT_ERROR = None
except Exception as exc:  # pragma: no cover - triton is pinned with torch
    triton = None
    tl = None
    IMPORT_ERROR = f"{type(exc).__name__}: {exc}"


if triton is not None:
    @triton.jit
    def widen(v):
        """fp16 / bf16 to fp32, exactly, on the GPU and in the interpreter (fp32, fp64
        unchanged). bf16 goes through its bits (the top half of the fp32 bits): the
        interpreter's bf16 -> fp32 cast renormalizes subnormals as if fp32 had a wider exponent
        range (bf16 0x0001, 9.2e-41, became +0.0, 0x8002, -1.8e-40, -0.0)."""
        # One return after constexpr branches: the compiler (unlike the interpreter) also visits
        # the statements after a taken `if ...: return`, and refuses returns of two types.
        if v.dtype == tl.bfloat16:
            wide = (v.to(tl.int16, bitcast=True).to(tl.int32) << 16).to(tl.float32, bitcast=True)
        elif v.dtype == tl.float16:
            wide = v.to(tl.float32)
        else:
            wide = v
        return wide
else:
    widen = None


# Test overrides (monkeypatched by tests/test_triton*.py to reach every mask and chunk path on
# tiny shapes):
#   SPLIT_OVERRIDE = (item chunks, channel chunks) per batch row, instead of the SM-based split
#                    (the row kernels always run one program per block of items: they take the
#                    channel chunks only);
#   BLOCK_OVERRIDE = tile sizes of the row kernels (BLOCK_R, BLOCK_P, BLOCK_C).
SPLIT_OVERRIDE: Optional[Tuple[int, int]] = None
BLOCK_OVERRIDE: Optional[dict] = None

# Programs per SM a launch aims at when the batch alone gives fewer.
PROGRAMS_PER_SM = 4

# Whether the kernels are interpreted: @triton.jit reads TRITON_INTERPRET when prune.py and
# rows.py define them, just after this module is imported, so setting it later changes nothing.
INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"


def unavailable_reason(device_type: str) -> Optional[str]:
    """None when the Triton kernels can run on `device_type` tensors, else why not."""
    if triton is None:
        return f"triton cannot be imported ({IMPORT_ERROR})"
    if device_type == "cuda":
        return None if torch.cuda.is_available() else "torch.cuda is not available"
    if device_type == "cpu":
        if INTERPRETER:
            return None
        if os.environ.get("TRITON_INTERPRET") == "1":
            return ("TRITON_INTERPRET=1 was set after the Triton kernels were defined: set it "
                    "before the first use of papr_kernels")
        return "Triton runs on CPU tensors only under the interpreter (set TRITON_INTERPRET=1)"
    return f"Triton kernels do not run on {device_type} tensors"


def next_pow2(v: int) -> int:
    return 1 << max(0, (int(v) - 1).bit_length())


def interpreted(device: torch.device) -> bool:
    """CPU tensors run under the interpreter: programs one after another, op by op in numpy, so
    the launchers use few programs with big tiles there."""
    return device.type != "cuda"


@functools.lru_cache(maxsize=None)
def multiprocessors(device: torch.device) -> int:
    """SM count of a CUDA device; 0 for interpreted launches (one program per batch row)."""
    if interpreted(device):
        return 0
    return torch.cuda.get_device_properties(device).multi_processor_count


def split(batch: int, items: int, channels: int, block_items: int, block_c: int, sms: int,
          per_block: bool = False) -> Tuple[int, int]:
    """(item chunks, channel chunks) of one batch row's work: enough programs at small B.

    A batch row has `items` rows (prune: output rows / gradient tokens; rows.py: kept rows or
    positions) and `channels` channels, tiled by block_items x block_c. The launch aims at
    PROGRAMS_PER_SM * sms programs in all (sms = 0: the interpreter, fewest programs win):
    items are cut into chunks of whole blocks first, then channels. per_block: the kernel runs one
    program per block of items (the row kernels), so the item chunks are the block count and only
    the channels are split further."""
    item_blocks = max(1, -(-items // block_items))
    if SPLIT_OVERRIDE is not None:
        item_chunks = item_blocks if per_block else max(1, min(SPLIT_OVERRIDE[0], items))
        return item_chunks, max(1, min(SPLIT_OVERRIDE[1], channels))
    if sms <= 0:
        return (item_blocks if per_block else 1), 1
    want = max(1, -(-PROGRAMS_PER_SM * sms // max(1, batch)))   # programs per batch row
    item_chunks = item_blocks if per_block else min(want, item_blocks)
    chan_chunks = max(1, min(-(-channels // block_c), -(-want // item_chunks)))
    return item_chunks, chan_chunks


def no_fp_fusion(device: torch.device) -> dict:
    """Launch options keeping `a * b + c` two roundings (no FMA contraction), as in torch's CPU
    code and the extension's kernels (nvcc --fmad=false)."""
    return {} if interpreted(device) else dict(enable_fp_fusion=False)


_INTERPRETER_LOCK = threading.Lock()


def launch_guard(device: torch.device):
    """Context for a launch on `device`'s tensors: that device made current on CUDA (its current
    stream is the launch stream), the interpreter lock on CPU."""
    return torch.cuda.device(device) if device.type == "cuda" else _INTERPRETER_LOCK


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def untraced(*tensors: torch.Tensor) -> bool:
    """True when a launcher may run without its custom op: plain tensors in eager mode, nothing
    recording or transforming the call (torch.compile and export, jit.trace, a Python dispatch
    mode such as FakeTensorMode or make_fx's, a torch function mode, vmap/grad transforms)."""
    return not (torch.compiler.is_compiling() or torch.jit.is_tracing()
                or _get_current_dispatch_mode() is not None
                or torch._C._is_torch_function_mode_enabled()
                or torch._C._are_functorch_transforms_active()) and \
        all(type(t) in _PLAIN for t in tensors)


def call(op: Callable, launch: Callable, *args):
    """`op(*args)`, a functional custom op whose body is `launch(*args)`: in plain eager the
    launcher itself (the custom op's dispatch costs ~12 us a call on CPU, for nothing there);
    wherever a call is recorded or transformed, the custom op (torch.compile sees an opaque op
    with a fake kernel)."""
    if untraced(*(a for a in args if isinstance(a, torch.Tensor))):
        return launch(*args)
    return op(*args)
