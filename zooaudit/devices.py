"""The one torch-device resolver (extraction, the factorizations, the similarity moments),
and :class:`cpu_threads`, the torch thread count for small CPU problems.

Accepted values: ``None``, ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or a
``torch.device``. ``None`` means ``"cpu"`` (every analysis' default: NumPy or torch on
the CPU); ``"auto"`` means CUDA when this process has it, else the CPU.

Callers differ in what the CPU and a missing GPU mean to them, and keep their own
behaviour through two keywords:

- ``cpu_as_none=True``: the CPU comes back as ``None`` — the callers' "no torch device"
  (the similarity moments then run in NumPy, faster there than torch; the factorize
  stage passes ``None`` on as the solvers' default);
- ``missing_cuda``: a CUDA device asked for where this process has no CUDA, or not that
  many devices, is an error (``"error"``, the default), falls back to the CPU (``"cpu"``:
  a CPU worker of a GPU run computes the moments in NumPy), or is returned unchecked
  (``"defer"``: the factorize stage leaves the check to the solver that uses the device,
  which names the layer; PCA never does).

torch is imported inside the function, so importing this module stays cheap (the
stages import it without torch).
"""

from __future__ import annotations

from .errors import ZooauditError

MISSING_CUDA = ("error", "cpu", "defer")


def resolve_device(device, *, what: str = "", cpu_as_none: bool = False, missing_cuda: str = "error"):
    """``device`` as a ``torch.device`` (or ``None`` for the CPU with ``cpu_as_none``).

    ``what`` completes the errors' sentence, e.g. ``" for layer 'conv1'"``. Raises
    :class:`~zooaudit.errors.ZooauditError` for a name torch does not know, a device type
    other than CPU or CUDA, and (``missing_cuda="error"``) an unavailable CUDA device,
    listing the devices this process has.
    """
    import torch

    if missing_cuda not in MISSING_CUDA:
        raise ValueError(f"missing_cuda must be one of {MISSING_CUDA}; got {missing_cuda!r}")
    if device is None:
        device = "cpu"
    cuda = torch.cuda.is_available()
    count = torch.cuda.device_count() if cuda else 0
    here = ["cpu", "auto", "None (the CPU)"] + (["cuda"] + [f"cuda:{i}" for i in range(count)] if cuda else [])
    if isinstance(device, str) and device == "auto":
        device = "cuda" if cuda else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ZooauditError(f"Bad torch device {device!r}{what}: {err}. Allowed here: {', '.join(here)}.") from err
    if dev.type not in ("cpu", "cuda"):
        raise ZooauditError(f"Bad torch device {device!r}{what}: only the CPU and CUDA are supported. "
                            f"Allowed here: {', '.join(here)}.")
    if dev.type == "cuda" and (not cuda or (dev.index is not None and dev.index >= count)):
        if missing_cuda == "cpu":
            dev = torch.device("cpu")
        elif missing_cuda == "error":
            why = "CUDA is not available here" if not cuda else f"this machine has {count} CUDA device(s)"
            raise ZooauditError(f"Device {device!r} requested{what} but {why}. Allowed here: {', '.join(here)}.")
    return None if cpu_as_none and dev.type == "cpu" else dev


def moments_device(device):
    """The similarity stages' device for the streamed moments: the run's device when it is a
    CUDA device this process has, else ``None`` (NumPy on the CPU, faster there than torch; a
    CPU worker of a GPU run uses NumPy, as the moments do not need the GPU)."""
    return resolve_device(device or None, what=" for the similarity moments", cpu_as_none=True, missing_cuda="cpu")


class cpu_threads:
    """Run small CPU problems (and every HALS sweep) on one torch thread.

    On a busy 2-core machine the thread pool turns a 500×40 matmul from ~20 µs into
    ~5 ms, and a 16-row sweep over 200k samples from 0.03 s into 1.5 s; below ``SMALL``
    elements per operand the pool costs more than it gives. The previous setting is
    restored on exit (it is process-wide: concurrent callers may briefly see 1 thread).
    ``device`` is a ``torch.device`` (:func:`resolve_device`); torch is imported here, when
    one is made, not with the module.
    """

    SMALL = 1 << 22

    def __init__(self, device, elements: int):
        import torch

        self.torch = torch
        self.active = device.type == "cpu" and elements < self.SMALL
        self.before = torch.get_num_threads()

    def __enter__(self):
        if self.active:
            self.torch.set_num_threads(1)
        return self

    def __exit__(self, *exc):
        if self.active:
            self.torch.set_num_threads(self.before)
        return False
