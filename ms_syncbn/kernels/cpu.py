"""CPU kernel table: our C++ kernels (ops/cpu/syncbn_cpu.cc) through ``ops.Custom(func_type="aot")``.

The library is built by ``setup.py`` into the package as ``_cpu_kernels.so``.

Dynamic shapes: a graph compiled once for inputs with unknown dimensions
(``Cell.set_inputs`` with ``None``) infers every kernel's output shape again at
run time, in C++ on the backend's copy of the primitive. MindSpore 2.10 cannot
call a Python ``out_shape`` there (the copy is not a ``PrimitivePy``), so each
kernel's shape function is C++, ``<Kernel>InferShape`` next to the kernel in
the library (``out_shape=None``), and each primitive carries registration info,
without which MindSpore's Custom shape inference fails on its missing
``reg_op_name`` attribute ("The pointer[value] is null"). Output dtypes stay
Python (``out_dtype``): the run-time re-inference asks for shapes only.
"""
import functools
import glob
import os

import mindspore as ms
from mindspore import ops
from mindspore.ops import CustomRegOp, DataType

from ms_syncbn.kernels import BatchNormKernels

_LIBRARY_GLOB = "_cpu_kernels*.so"


def cpu_library_path() -> str:
    """Absolute path of the built CPU kernel library.

    Raises:
        RuntimeError: If the library has not been built.
    """
    package_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    found = sorted(glob.glob(os.path.join(package_dir, _LIBRARY_GLOB)))
    if not found:
        raise RuntimeError(f"ms_syncbn: the CPU kernels are not built (no {_LIBRARY_GLOB} in "
                           f"{package_dir}). Install the package with `pip install -e .` or "
                           f"`pip install .` from the repository root, which compiles ops/cpu/.")
    return found[0]


class _SharedCustom(ops.Custom):
    """An AOT kernel primitive that copies of a model share (``copy.deepcopy``, e.g. an EMA or
    teacher copy): it holds no state, as the table is shared by every layer of the process.
    (MindSpore 2.10 copies a primitive by rebuilding it from ``init_attrs``, which fails for
    ``ops.Custom``: "unexpected keyword argument 'name'".)"""

    def __deepcopy__(self, memo):
        return self


def _custom(symbol: str, inputs, out_dtype, outputs=("output",)) -> _SharedCustom:
    """The AOT primitive of kernel `symbol` of the library, whose inputs are named `inputs`.

    Its output shape is the library's ``<symbol>InferShape`` (C++, so also for dynamic shapes:
    see the module docstring), its output dtype ``out_dtype(*input_dtypes)``. The registration
    info names the kernel and accepts any dtype and format: the kernel checks its dtypes itself.
    A kernel with several `outputs` (names) returns a tuple; its ``<symbol>InferShape`` then
    returns ``std::vector<std::vector<int64_t>>``, one shape per output, and `out_dtype` a
    tuple of dtypes (MindSpore's multi-output convention, keyed on the registered outputs).
    """
    info = CustomRegOp(symbol)
    for index, name in enumerate(inputs):
        info = info.input(index, name)
    for index, name in enumerate(outputs):
        info = info.output(index, name)
    any_dtype = (DataType.None_None,) * (len(inputs) + len(outputs))
    info = info.dtype_format(*any_dtype).target("CPU").get_op_info()
    return _SharedCustom(f"{cpu_library_path()}:{symbol}", out_shape=None, out_dtype=out_dtype,
                         func_type="aot", reg_info=info)


# No adapters: every entry of the table is a kernel primitive, called as the contract says
# (no Concat, slicing, Mul or cast around it), so a layer step costs one kernel per entry.


@functools.lru_cache(maxsize=None)
def cpu_kernels() -> BatchNormKernels:
    """The CPU table; primitives are created once per process and shared by all layers."""
    return BatchNormKernels(
        backend="CPU",
        # x (N, C, *), shift (C,) -> mean_i, var_i (C,) f32
        local_moments=_custom("LocalMoments", ("x", "shift"), lambda x, k: (ms.float32,) * 2,
                              outputs=("mean", "var")),
        # x, mean, invstd, weight, bias -> y like x
        normalize=_custom("Normalize", ("x", "mean", "invstd", "weight", "bias"),
                          lambda x, m, s, w, b: x),
        # reduced (C+5,), local_mean, local_var (C,), count (1,), expected (3,), if_equal,
        #   if_unequal (3, 3), text (T,) -> m2_part, mean (C,), group_count,
        #   group_count_less_one, code, increment (1,) f32, or a RuntimeError carrying the code
        combine_moments=_custom("CombineMoments", ("reduced", "local_mean", "local_var", "count",
                                                   "expected", "if_equal", "if_unequal", "text"),
                                lambda *inputs: (ms.float32,) * 6,
                                outputs=("m2_part", "mean", "group_count", "group_count_less_one",
                                         "code", "increment")),
        # m2 (C,), group_count, group_count_less_one, eps (1,) -> invstd, var (unbiased) (C,) f32
        finalize_moments=_custom("FinalizeMoments", ("m2", "group_count", "group_count_less_one",
                                                     "eps"),
                                 lambda *inputs: (ms.float32,) * 2, outputs=("invstd", "var")),
        # mean, var (unbiased), shift, running_mean, running_var (C,), factor (1,)
        #   -> shift', running_mean', running_var' (C,) f32
        update_stats=_custom("UpdateStats", ("mean", "var", "shift", "running_mean", "running_var",
                                             "factor"),
                             lambda m, v, s, rm, rv, f: (ms.float32,) * 3,
                             outputs=("shift", "running_mean", "running_var")),
        # dy, x, mean, invstd -> sum(dy), sum(dy*(x-mean)), grad_weight, grad_bias (C,) f32
        backward_reduce=_custom("BackwardReduce", ("dy", "x", "mean", "invstd"),
                                lambda dy, x, m, s: (ms.float32,) * 4,
                                outputs=("sum_dy", "sum_dy_xmu", "grad_weight", "grad_bias")),
        # dy, x, mean, invstd, weight, sum_dy, sum_dy_xmu (C,), count (1,) -> dx like x
        backward_elemt=_custom("BackwardElemt", ("dy", "x", "mean", "invstd", "weight", "sum_dy",
                                                 "sum_dy_xmu", "count"),
                               lambda dy, x, m, s, w, sdy, sdyx, n: x),
        # invstd (C,), modulus (1,) -> (1,) f32
        fingerprint=_custom("Fingerprint", ("invstd", "modulus"), lambda s, q: ms.float32),
        # values (M,), reduced_tag, tag, group_size, code (1,), text (T,) f32 -> values, or a
        # RuntimeError carrying the code when reduced_tag != tag * group_size
        check_pairing=_custom("CheckPairing", ("values", "reduced_tag", "tag", "group_size", "code",
                                               "text"),
                              lambda values, r, t, g, k, text: values),
        reads_shift=True,
    )
