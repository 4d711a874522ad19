"""Per-expert LoRA: the pure-torch `ExpertLayout` (`layout`) and its PEFT side (`lora`).

Nothing is imported here, so the aggregation server can import `hf_fcmoe.adapters.layout` without
loading PEFT or transformers.
"""
