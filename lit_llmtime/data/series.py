"""Series from where users keep them: the coursework h5 file, a numpy array, or a long-format CSV
or parquet table (one row per series and time step, one column per variable). Any number of
variables, series of different lengths; every bad value is reported with its file, column and row."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from lit_llmtime.io import atomic_path

COURSEWORK_VARIABLES = ("prey", "predator")
ID_COLUMN, TIME_COLUMN = "series_id", "time"
TABLE_SUFFIXES = (".csv", ".parquet")
SUFFIXES = (".h5", ".hdf5", ".npy", *TABLE_SUFFIXES)


class DataFileError(ValueError):
    """A data file is missing, unreadable, or holds a value that cannot be used."""


@dataclass
class SeriesSet:
    """Series of ``len(variables)`` variables each, in the file's order.

    ``values[i]`` is (T_i, D) float64 and ``time[i]`` its (T_i,) time axis (numbers, or
    ``datetime64`` from a table's timestamps); ``ids[i]`` names the series in messages and outputs.
    """

    values: list[np.ndarray]
    time: list[np.ndarray]
    variables: tuple[str, ...]
    ids: list[str]
    source: str = "<memory>"

    def __len__(self) -> int:
        return len(self.values)

    @property
    def lengths(self) -> np.ndarray:
        return np.array([len(v) for v in self.values])

    def common_time(self) -> np.ndarray:
        """One numeric axis for all series (plots, the ODE reference): the longest series' time
        when every other series' time starts it, else the step numbers 0, 1, ..."""
        longest = self.time[int(np.argmax(self.lengths))]
        if np.issubdtype(longest.dtype, np.number) and all(np.array_equal(t, longest[: len(t)]) for t in self.time):
            return longest.astype(np.float64)
        return np.arange(len(longest), dtype=np.float64)

    def as_array(self) -> np.ndarray:
        """(N, T, D) when every series has the same length."""
        if len(set(self.lengths.tolist())) != 1:
            raise DataFileError(f"{self.source}: series of different lengths do not make one (N, T, D) array")
        return np.stack(self.values)


def default_variables(count: int) -> tuple[str, ...]:
    """Names for unnamed variables: x0, x1, ... (the coursework h5 layout names its two prey and predator)."""
    return tuple(f"x{k}" for k in range(count))


def from_arrays(values, time=None, variables=None, ids=None, source: str = "<memory>") -> SeriesSet:
    """A ``SeriesSet`` from one (T, D) array, an (N, T, D) array or a list of (T_i, D) arrays (a
    1-D array is one series of one variable), checked as a file would be."""
    if isinstance(values, list | tuple):
        arrays = list(values)
    else:
        array = np.asarray(values)
        arrays = list(array) if array.ndim == 3 else [array]
    arrays = [np.asarray(a, dtype=np.float64) for a in arrays]
    arrays = [a[:, None] if a.ndim == 1 else a for a in arrays]
    ids = [str(i) for i in range(len(arrays))] if ids is None else [str(i) for i in ids]
    for name, array in zip(ids, arrays, strict=True):
        if array.ndim != 2:
            raise DataFileError(f"{source}: series {name} has shape {array.shape}; expected (steps, variables)")
    widths = {a.shape[1] for a in arrays}
    if len(widths) != 1:
        raise DataFileError(f"{source}: series have different numbers of variables {sorted(widths)}")
    width = widths.pop()
    variables = default_variables(width) if variables is None else tuple(variables)
    if len(variables) != width:
        raise DataFileError(f"{source}: {len(variables)} variable names {list(variables)} for {width} variables")
    times = [np.arange(len(a), dtype=np.float64) for a in arrays] if time is None else list(time)
    series = SeriesSet(arrays, times, variables, ids, source)
    check_series(series)
    return series


def check_series(series: SeriesSet, min_steps: int = 2) -> None:
    """Raise DataFileError naming the series, step and variable of the first non-finite value, or
    the first series shorter than ``min_steps``."""
    for name, values in zip(series.ids, series.values, strict=True):
        if len(values) < min_steps:
            raise DataFileError(f"{series.source}: series {name} has {len(values)} steps; at least {min_steps} needed")
        if not np.all(np.isfinite(values)):
            step, variable = np.argwhere(~np.isfinite(values))[0].tolist()
            raise DataFileError(
                f"{series.source}: series {name}, step {step}, variable {series.variables[variable]!r} "
                f"is {values[step, variable]}: every value must be a finite number"
            )


def load_series(
    path: str | Path, id_column: str = ID_COLUMN, time_column: str = TIME_COLUMN, target: list[str] | None = None
) -> SeriesSet:
    """Read a data file by its suffix (``.h5``, ``.npy``, ``.csv``, ``.parquet``); see the module."""
    path = Path(path)
    if path.suffix.lower() not in SUFFIXES:
        raise DataFileError(f"{path}: unknown data file type {path.suffix!r}; use one of {', '.join(SUFFIXES)}")
    if not path.is_file():
        raise DataFileError(
            f"{path}: data file not found. Generate one with `lit-llmtime simulate --out {path}` "
            "or point data.data_path at your file."
        )
    if path.suffix.lower() in (".h5", ".hdf5"):
        return load_h5(path)
    if path.suffix.lower() == ".npy":
        return load_npy(path)
    return load_table(path, id_column, time_column, target)


def load_h5(path: str | Path) -> SeriesSet:
    """``trajectories`` (N, T, D) and ``time`` (T,), as the coursework file (D = 2: prey, predator;
    names from a ``variables`` attribute when present). Populations cannot be negative."""
    try:
        with h5py.File(path, "r") as f:
            arrays = {}
            for name in ("trajectories", "time"):
                if name not in f or not isinstance(f[name], h5py.Dataset):
                    raise DataFileError(f"{path}: missing dataset '{name}' (found: {sorted(f.keys())})")
                arrays[name] = f[name][()]
            names = f["trajectories"].attrs.get("variables")
    except OSError as error:
        raise DataFileError(f"{path}: not a readable HDF5 file ({error})") from error
    trajectories, time = arrays["trajectories"], arrays["time"]
    if trajectories.ndim != 3 or trajectories.shape[1] < 2 or trajectories.shape[2] < 1:
        raise DataFileError(
            f"{path}: dataset 'trajectories' must have shape (N, T, D) with T >= 2, got {trajectories.shape}"
        )
    if time.shape != (trajectories.shape[1],):
        raise DataFileError(f"{path}: dataset 'time' must have shape ({trajectories.shape[1]},), got {time.shape}")
    for name, array in arrays.items():
        if not np.issubdtype(array.dtype, np.floating):
            raise DataFileError(f"{path}: dataset '{name}' must be floating point, got {array.dtype}")
        if not np.all(np.isfinite(array)):
            first = np.argwhere(~np.isfinite(array))[0].tolist()
            raise DataFileError(f"{path}: dataset '{name}' has a non-finite value at index {first}")
    if np.any(trajectories < 0):
        sample, step, variable = np.argwhere(trajectories < 0)[0].tolist()
        raise DataFileError(
            f"{path}: trajectory {sample}, step {step}, variable {variable} is {trajectories[sample, step, variable]}: "
            "populations cannot be negative (the LLMTIME grammar and the Lotka-Volterra reference assume >= 0)"
        )
    if names is not None:
        variables = [str(n.decode() if isinstance(n, bytes) else n) for n in names]
    else:  # the coursework file has no names: its two variables are prey and predator
        variables = COURSEWORK_VARIABLES if trajectories.shape[2] == 2 else None
    return from_arrays(trajectories, [time] * len(trajectories), variables, source=str(path))


def load_npy(path: str | Path) -> SeriesSet:
    """An (N, T, D) array of N series, or (T, D) of one; time is the step number."""
    try:
        array = np.load(path, allow_pickle=False)
    except ValueError as error:
        raise DataFileError(
            f"{path}: not a numeric numpy array ({error}); save series of different lengths as CSV or parquet"
        ) from error
    if array.ndim not in (2, 3) or not np.issubdtype(array.dtype, np.number):
        raise DataFileError(f"{path}: expected a numeric (N, T, D) or (T, D) array, got {array.dtype} {array.shape}")
    return from_arrays(array if array.ndim == 3 else array[None], source=str(path))


def load_table(
    path: str | Path, id_column: str = ID_COLUMN, time_column: str = TIME_COLUMN, target: list[str] | None = None
) -> SeriesSet:
    """A long-format CSV or parquet file (see ``series_from_frame``)."""
    import pandas as pd

    path = Path(path)
    csv = path.suffix.lower() == ".csv"
    try:
        frame = pd.read_csv(path, float_precision="round_trip") if csv else pd.read_parquet(path)
    except (ValueError, OSError, ImportError, pd.errors.ParserError) as error:
        raise DataFileError(f"{path}: not a readable {'CSV' if csv else 'parquet'} file ({error})") from error
    return series_from_frame(frame, id_column, time_column, target, str(path), first_line=2 if csv else None)


def series_from_frame(
    frame,
    id_column: str = ID_COLUMN,
    time_column: str = TIME_COLUMN,
    target: list[str] | None = None,
    source: str = "DataFrame",
    first_line: int | None = None,
) -> SeriesSet:
    """Series of a long-format table: ``id_column`` (optional: one series), ``time_column``
    (optional: the row order; numbers or timestamps, sorted within each series) and the ``target``
    columns (default: every other column), as Chronos' ``predict_df`` takes them. Errors name the
    row (a CSV's line: ``first_line`` is the first data row's)."""
    import pandas as pd

    def row(position: int) -> str:
        return f"row {position}" if first_line is None else f"line {position + first_line}"

    columns = [str(c) for c in frame.columns]
    for name, column, default in (("id_column", id_column, ID_COLUMN), ("time_column", time_column, TIME_COLUMN)):
        if column != default and column not in columns:  # a mistyped name would make a variable of the real one
            raise DataFileError(f"{source}: no {name} {column!r} (columns: {columns})")
    target = [c for c in columns if c not in (id_column, time_column)] if target is None else list(target)
    missing = [c for c in target if c not in columns]
    if missing or not target:
        raise DataFileError(f"{source}: no column {missing or 'to forecast'} (columns: {columns})")
    for column in target:
        numbers = pd.to_numeric(frame[column], errors="coerce")
        bad = numbers.isna() & frame[column].notna()
        if bad.any():
            position = int(np.argmax(bad.to_numpy()))
            raise DataFileError(
                f"{source}: column {column!r}, {row(position)}: {frame[column].iloc[position]!r} is not a number"
            )
        finite = np.isfinite(numbers.to_numpy(dtype=np.float64))
        if not finite.all():
            position = int(np.argmin(finite))
            raise DataFileError(
                f"{source}: column {column!r}, {row(position)}: missing or non-finite value ({numbers.iloc[position]})"
            )
    numbers = frame[target].apply(pd.to_numeric).to_numpy(dtype=np.float64)
    ids = frame[id_column].astype(str).to_numpy() if id_column in frame else np.full(len(frame), "0")
    time = None
    if time_column in frame:
        time = frame[time_column]
        if not pd.api.types.is_numeric_dtype(time):
            try:
                with warnings.catch_warnings(action="ignore", category=UserWarning):  # "could not infer format"
                    time = pd.to_datetime(time, utc=True).dt.tz_convert(
                        None
                    )  # one clock: UTC (naive times as they are)
            except (ValueError, TypeError) as error:
                message = f"{source}: column {time_column!r} holds neither numbers nor times ({error})"
                raise DataFileError(message) from error
        if time.isna().any():
            position = int(np.argmax(time.isna().to_numpy()))
            raise DataFileError(f"{source}: column {time_column!r}, {row(position)}: missing time")
        time = time.to_numpy()
    arrays, times, names = [], [], []
    for name in dict.fromkeys(ids.tolist()):  # in order of first appearance
        rows = np.flatnonzero(ids == name)
        if time is not None:
            rows = rows[np.argsort(time[rows], kind="stable")]
            repeated = np.flatnonzero(time[rows][1:] == time[rows][:-1])
            if len(repeated):
                first, second = sorted(rows[repeated[0] : repeated[0] + 2].tolist())
                raise DataFileError(
                    f"{source}: series {name} has {time_column} {time[first]} twice ({row(first)} and {row(second)})"
                )
        arrays.append(numbers[rows])
        times.append(time[rows] if time is not None else np.arange(len(rows), dtype=np.float64))
        names.append(name)
    return from_arrays(arrays, times, target, names, source=source)


def save_series(path: str | Path, series: SeriesSet) -> Path:
    """Write ``series`` atomically in the format of ``path``'s suffix (what ``load_series`` reads):
    a long table, an (N, T, D) array (equal lengths; time is not kept), or the coursework h5 layout
    (equal lengths, one time axis)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise DataFileError(f"{path}: unknown data file type {path.suffix!r}; use one of {', '.join(SUFFIXES)}")
    if suffix in TABLE_SUFFIXES:
        import pandas as pd

        rows = zip(series.ids, series.time, series.values, strict=True)
        frame = pd.concat(
            [pd.DataFrame({ID_COLUMN: name, TIME_COLUMN: time} | dict(zip(series.variables, values.T, strict=True)))
             for name, time, values in rows],
            ignore_index=True,
        )  # fmt: skip
        return write_table(path, frame)
    with atomic_path(path) as tmp:
        if suffix == ".npy":
            with open(tmp, "wb") as f:
                np.save(f, series.as_array())
        else:
            with h5py.File(tmp, "w") as f:
                f.create_dataset("trajectories", data=series.as_array())
                f.create_dataset("time", data=series.common_time())
                f["trajectories"].attrs["variables"] = list(series.variables)
    return path


def write_table(path: str | Path, frame) -> Path:
    """Write a DataFrame atomically as CSV or (``.parquet``) parquet, without its index."""
    path = Path(path)
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False) if path.suffix.lower() == ".parquet" else frame.to_csv(tmp, index=False)
    return path
