"""Small helpers with no knowledge of quantization: argument checks, module names, tables, file writes."""

from lightning_quant.utils.files import atomic_write
from lightning_quant.utils.tables import format_table, speed_change

__all__ = ["atomic_write", "format_table", "speed_change"]
