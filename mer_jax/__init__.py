"""mer_jax: multimodal emotion recognition and sentiment models that stay accurate when
text, audio or video is missing (JAX / Flax)."""

# First, before JAX starts its CPU backend: malloc keeps the memory XLA frees after each
# execution for the next one (`host_memory`; MER_JAX_KEEP_FREED_MEMORY=0 turns it off).
from mer_jax import host_memory as _host_memory

_host_memory.keep_freed_memory()
