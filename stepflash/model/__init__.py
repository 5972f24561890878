from stepflash.model.transformer import DecoderLayer, MTPLayer, Step35ForCausalLM, Step35Model

__all__ = ["DecoderLayer", "MTPLayer", "Step35ForCausalLM", "Step35Model"]
