"""Optional integrations, each imported only when used (``wavg_fused.integrations.lightning``, ``.timm``, ``.ema_pytorch``)."""
