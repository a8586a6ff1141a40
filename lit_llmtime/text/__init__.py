"""LLMTIME text: the codec (arrays <-> digit strings), the grammar that constrains generation, and tokenizers."""
