"""The environment DeepSpeed's just-in-time op builds need, settled before the engine is made.

DeepSpeed compiles some ops on first use (fused Adam when a DeepSpeed file asks for it with
`"torch_adam": false`, DeepCompile's native op, the CPU communication op). Its builder reads
TORCH_CUDA_ARCH_LIST and parses every entry as numbers, so an architecture with a feature suffix such as
"9.0a" (Hopper's wgmma variant, which some CUDA images set) fails the build with
"invalid literal for int() with base 10: '0a'". None of DeepSpeed's ops needs the suffixed variant, so lorakit
drops the suffix for this process and says so; torch extensions built later in the process see the same list.
"""

from __future__ import annotations

import os
import re

ARCH = re.compile(r"^(\d+\.\d+)[a-z]+(\+PTX)?$")


def settle_cuda_arch_list(environ: dict[str, str] | os._Environ = os.environ) -> list[str]:
    """Rewrite suffixed architectures in TORCH_CUDA_ARCH_LIST ("9.0a" -> "9.0"); returns the log line, if any."""
    current = environ.get("TORCH_CUDA_ARCH_LIST", "")
    entries = current.replace(" ", ";").split(";")
    fixed = [ARCH.sub(r"\1\2", entry.strip()) for entry in entries if entry.strip()]
    if ";".join(fixed) == ";".join(e.strip() for e in entries if e.strip()):
        return []
    environ["TORCH_CUDA_ARCH_LIST"] = ";".join(dict.fromkeys(fixed))
    return [f"TORCH_CUDA_ARCH_LIST={current!r} has architectures DeepSpeed's op builder cannot parse; using "
            f"{environ['TORCH_CUDA_ARCH_LIST']!r} for this run (lorakit.engine.jit)"]  # fmt: skip
