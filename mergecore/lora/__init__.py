"""LoRA adapters as outputs: `extract.py` turns a fine-tune and its base into a PEFT adapter
(`plan.py` what is factorised and what is kept whole, `factor.py` the truncated SVD, `output.py`
the atomic adapter folder)."""
