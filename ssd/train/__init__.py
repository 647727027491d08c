"""Draft distillation (`ssd train-draft`): a small Llama-style draft trained on the target's own
greedy continuations, sharing the target's tokenizer and (frozen) embedding."""
