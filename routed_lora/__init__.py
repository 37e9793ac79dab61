"""routed-lora: a frozen backbone with one LoRA adapter per ability, chosen per token (DART-style agentic RL).

The core is :class:`RoutedLoRALinear`, a drop-in ``nn.Linear`` computing ``W x + b + s * B[k] A[k] x`` with the
adapter ``k`` chosen per token, and a backward that writes each adapter's gradient only from its own tokens.
"""

from .backend import get_backend, set_backend
from .layer import RoutedLoRALinear, clear_routes, routed_lora_linear, set_routes, validate_routes

# The HF integration, router and adapter files import transformers / safetensors only when used, so these
# imports work without the optional ``hf`` extra.
from .hf import apply_routed_lora, disable_adapters, remove_routed_lora, set_adapter_lr, trainable_parameters
from .router import TagRouter
from .adapter_io import load_adapters, save_adapters
from .peft_convert import peft_to_routed
from .router import route_packed, sequence_starts

__version__ = "0.1.0"

__all__ = [
    "RoutedLoRALinear",
    "routed_lora_linear",
    "set_routes",
    "clear_routes",
    "validate_routes",
    "apply_routed_lora",
    "remove_routed_lora",
    "disable_adapters",
    "trainable_parameters",
    "set_adapter_lr",
    "TagRouter",
    "save_adapters",
    "load_adapters",
    "peft_to_routed",
    "route_packed",
    "sequence_starts",
    "set_backend",
    "get_backend",
    "__version__",
]
