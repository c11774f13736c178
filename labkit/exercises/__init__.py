"""Checkers for the chapters' exercises and Build-it labs, one module a chapter (ch0 ... ch9).

Each checker takes the reader's function or answer, runs it on inputs the reader does not see
against labkit's reference or the library used in practice (peft, bitsandbytes, transformers), and
prints one line starting with ✓, or raises an AssertionError that says what is wrong. A function
that still raises NotImplementedError is reported as not attempted (no error), so "run all" goes
through a notebook whose labs are not done yet. `graded()` (in _common) is what a grading tool
wraps them in. The notebooks call them as lk.exercises.check_...; each chapter's module imports
only what the reader has met by that chapter (tests/test_rooms.py)."""
from . import _common, ch0, ch1, ch2, ch3, ch4, ch5, ch6, ch7, ch8, ch9
from ._common import graded
from .ch0 import check_full_finetune_bytes
from .ch1 import check_eckart_young_error, check_lora_savings, check_low_rank_approx
from .ch2 import check_lora_forward, check_lora_linear, check_rslora_scaling
from .ch3 import check_inject, check_trainable_count
from .ch4 import check_bits_per_parameter, check_nf4_blockwise, check_nf4_codebook, check_pack
from .ch5 import check_lora_grad_flow, check_nf4_matmul, check_qlora_weight_bytes
from .ch6 import check_adapter_mib, check_answer_fraction, check_largest_batch, check_make_labels, check_train_step
from .ch7 import (check_lora_params, check_matching_lr, check_rank_under_budget, check_same_step_scale,
                  check_subspace_similarity)
from .ch8 import check_bottleneck_params, check_ia3_params, check_prompt_params, check_virtual_tokens
from .ch9 import check_best_other, check_fsdp_bytes, check_mixed_lora, check_router
