"""The LoRA group of the configuration (lorakit.config): rank, targets and the variants PEFT offers.

Same rules as lorakit.config: every field is a flag of the same name, value-only checks in `__post_init__`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from lorakit.errors import LorakitError


def _doc(text: str, **extra: Any) -> dict[str, Any]:
    return {"help": " ".join(text.split()), **extra}


@dataclass(frozen=True)
class LoraSettings:
    finetuning_type: str = field(default="lora", metadata=_doc("Only `lora` is supported."))
    lora_rank: int = field(default=8, metadata=_doc("LoRA rank r."))
    lora_alpha: float | None = field(default=None, metadata=_doc("LoRA alpha (scale = alpha / r); default 2 x rank."))
    lora_dropout: float = field(default=0.0, metadata=_doc("Dropout on the LoRA input."))
    lora_target: tuple[str, ...] = field(
        default=("all",),
        metadata=_doc("Comma-separated module names to adapt, or `all` for every linear layer except the output head."),
    )
    use_rslora: bool = field(
        default=False, metadata=_doc("rsLoRA: scale the adapter by alpha / sqrt(rank) instead of alpha / rank (PEFT).")
    )
    use_dora: bool = field(
        default=False,
        metadata=_doc("DoRA: a trained magnitude per output feature on top of LoRA's direction (PEFT's use_dora)."),
    )
    loraplus_lr_ratio: float | None = field(
        default=None,
        metadata=_doc("LoRA+: the lora_B matrices learn at --learning_rate x this ratio (e.g. 16); default off."),
    )
    pissa_init: bool = field(
        default=False,
        metadata=_doc(
            "PiSSA: start the adapter from each adapted weight's top --lora_rank singular vectors and train on the "
            "residual weight (PEFT's init_lora_weights=pissa)."
        ),
    )
    pissa_iter: int | None = field(
        default=None,
        metadata=_doc("PiSSA's fast-SVD iterations (default 16; -1: the exact SVD, slower). Needs --pissa_init."),
    )
    pissa_convert: bool | None = field(
        default=None,
        metadata=_doc(
            "Save PiSSA adapters converted to plain LoRA of twice the rank, for the unmodified base model (PEFT's "
            "path_initial_model_for_weight_conversion). Default: on with --pissa_init; false saves the adapter for "
            "the residual base, with its starting point in pissa_init/ beside it."
        ),
    )
    additional_target: tuple[str, ...] = field(
        default=(),
        metadata=_doc(
            "Comma-separated modules trained in full beside LoRA, e.g. embed_tokens,lm_head; saved in the adapter "
            "(PEFT's modules_to_save) and written into a merged model."
        ),
    )

    def __post_init__(self) -> None:
        if self.finetuning_type != "lora":
            raise LorakitError(f"--finetuning_type {self.finetuning_type} is not supported; lorakit trains `lora` only")
        if self.lora_rank < 1:
            raise LorakitError(f"--lora_rank {self.lora_rank} must be at least 1")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise LorakitError(f"--lora_dropout {self.lora_dropout} must be in [0, 1)")
        if not self.lora_target:
            raise LorakitError("--lora_target is empty; name modules (q_proj,v_proj,...) or use `all`")
        if "all" in self.lora_target and len(self.lora_target) > 1:  # else `all` is looked up as a module name
            raise LorakitError(f"--lora_target {','.join(self.lora_target)}: `all` already means every linear layer; "
                               "give `all` alone, or module names only")  # fmt: skip
        if self.lora_alpha is not None and not (math.isfinite(self.lora_alpha) and self.lora_alpha > 0):
            # alpha 0 scales every update to nothing: a run that trains nothing and saves a useless adapter
            raise LorakitError(f"--lora_alpha {self.lora_alpha} must be a positive number (the adapter's scale is "
                               "alpha / rank; leave it out for 2 x rank)")  # fmt: skip
        ratio = self.loraplus_lr_ratio
        if ratio is not None and not (math.isfinite(ratio) and ratio > 0):
            raise LorakitError(f"--loraplus_lr_ratio {ratio} must be a positive number (lora_B's learning rate is "
                               "--learning_rate x this ratio; leave it out for plain LoRA)")  # fmt: skip
        self._check_pissa()

    def _check_pissa(self) -> None:
        if not self.pissa_init:
            given = [f"--{n}" for n in ("pissa_iter", "pissa_convert") if getattr(self, n) is not None]
            if given:
                raise LorakitError(f"{' and '.join(given)} applies to PiSSA only; add --pissa_init or drop it")
        elif self.pissa_iter is not None and self.pissa_iter < -1:
            raise LorakitError(f"--pissa_iter {self.pissa_iter} must be -1 (the exact SVD) or 0 and above (fast SVD "
                               "iterations; 16 by default)")  # fmt: skip

    @property
    def pissa_method(self) -> str | None:
        """PEFT's init_lora_weights for these flags (None: no PiSSA): pissa (exact SVD) or pissa_niter_N."""
        if not self.pissa_init:
            return None
        iterations = 16 if self.pissa_iter is None else self.pissa_iter
        return "pissa" if iterations == -1 else f"pissa_niter_{iterations}"

    @property
    def alpha(self) -> float:
        return self.lora_alpha if self.lora_alpha is not None else 2.0 * self.lora_rank
