"""Publishing runs to the Hugging Face Hub: layout (plan.py), model cards (cards.py), the pushes (publisher.py).

This sub-package is the only part of hf_fcmoe that writes to the Hub.
"""
