"""Series files, the simulator, token windows, prompts and the LightningDataModule."""

from typing import Any

from lit_llmtime.config import deprecated


def __getattr__(name: str) -> Any:
    """``lit_llmtime.data.LotkaVolterraDataModule``, the data module's old name, still imports."""
    if name == "LotkaVolterraDataModule":
        from lit_llmtime.data.module import SeriesDataModule

        deprecated("lit_llmtime.data.LotkaVolterraDataModule", "lit_llmtime.data.SeriesDataModule")
        return SeriesDataModule
    if name == "SeriesDataModule":
        from lit_llmtime.data.module import SeriesDataModule

        return SeriesDataModule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
