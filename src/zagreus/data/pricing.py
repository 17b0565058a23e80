"""What a data stage will cost before it runs: text to read, work units, disk and CPU-hours.

The rates are measurements, not guesses (docs/benchmarks.md, "Data: tokenization throughput",
`python benchmarks/data_tokenize.py --mb 50`, the slower of its two runs): the Debian handbook in
five languages gave 13,842,558 Llama-3 tokens from 56.9 MB of text (4.11 bytes a token), end to
end (read, tokenize, unit files, final shards, manifest) in 3.71 CPU seconds, 3.73 M tokens per
CPU-second. Other text differs (code and PDFs tokenize differently; reading parquet from the hub
adds decompression and download time, not counted here), so the figures are estimates to plan a
cluster allocation with, shown beside the report's own rule of thumb.
"""

from __future__ import annotations

from dataclasses import dataclass

from zagreus.recipe import DataSection, TokenizerSection

BYTES_PER_TOKEN = 56.9e6 / 13_842_558
BYTES_PER_DOCUMENT = 6_230_324 / 635   # the handbook's mean page, for dedup's per-document files
TOKENS_PER_CPU_SECOND = 13_842_558 / 3.71
LLAMA3_VOCAB = 128_256
# The report (section 3.2): "for every 1 GB of text, approximately 3 GB of tokenized outputs" and
# "for ~ 1 trillion tokens, one typically requires at least 3 to 5 terabytes". The two disagree
# at 4 bytes of text a token (the first gives ~12 TB); both are shown.
REPORT_GB_PER_TEXT_GB = 3.0
REPORT_TB_PER_TRILLION = (3.0, 5.0)


@dataclass
class DataPrice:
    tokens: float
    text_bytes: float
    units: int
    tasks: int
    shard_bytes: float  # the final .ds files (token ids; the index and metadata are a small share)
    peak_disk_bytes: float  # while the stage runs: the final shards, plus dedup's signatures when it is on
    cpu_hours: float
    wall_hours: float  # with every task of the executor at work

    def lines(self) -> list[str]:
        tb = 1e12
        return [
            f"  data volume   : {self.tokens:.3g} tokens from about {self.text_bytes / tb:.2f} TB of text "
            f"({BYTES_PER_TOKEN:.2f} bytes a token, measured on the handbook)",
            f"  data units    : {self.units:,} work units over {self.tasks:,} tasks",
            f"  data disk     : {self.shard_bytes / tb:.2f} TB of final shards, {self.peak_disk_bytes / tb:.2f} TB at the "
            f"peak (workers write the final shards; dedup's signatures when on); the report's rules of thumb: 3 GB per GB of text "
            f"({REPORT_GB_PER_TEXT_GB * self.text_bytes / tb:.1f} TB here), and 3 to 5 TB for ~1T tokens "
            f"({REPORT_TB_PER_TRILLION[0] * self.tokens / 1e12:.1f}-{REPORT_TB_PER_TRILLION[1] * self.tokens / 1e12:.1f} TB here)",
            f"  data CPU      : {self.cpu_hours:,.0f} CPU-hours at {TOKENS_PER_CPU_SECOND / 1e6:.2f} M tokens per "
            f"CPU-second (measured), {self.wall_hours:,.1f} h on {self.tasks:,} tasks; hub downloads not counted",
        ]


def price(data: DataSection, tokenizer: TokenizerSection) -> DataPrice | None:
    """The estimate for a token budget (data.tokens); None without one (local corpora are read whole)."""
    if data.tokens is None:
        return None
    # A tokenizer folder's size is unknown before it is read: priced at the Llama-3 vocabulary's 4 bytes.
    vocab = tokenizer.train.vocab_size if tokenizer.train is not None else LLAMA3_VOCAB
    token_bytes = 4 if vocab > 65536 else 2  # zagreus.data.shards.token_dtype
    text = data.tokens * BYTES_PER_TOKEN
    units = max(1, round(text / data.unit_bytes))
    tasks = data.executor.task_count
    cpu_hours = data.tokens / TOKENS_PER_CPU_SECOND / 3600
    shards = data.tokens * token_bytes
    peak = shards + signature_bytes(data, text)
    # A task encodes on one core (docs/benchmarks.md: threads oversubscribe), so tasks run side by side.
    return DataPrice(data.tokens, text, units, tasks, shards, peak, cpu_hours, cpu_hours / min(tasks, units))


def signature_bytes(data: DataSection, text_bytes: float) -> float:
    """Dedup's files per document (zagreus.data.dedup): a uint64 key and uint32 document number per
    key row (exact, then one per MinHash band), the MinHash signature and the document's ordinal."""
    f = data.filters
    if f.dedup == "none":
        return 0.0
    rows = 1 + (f.minhash.bands if f.dedup == "minhash" else 0)
    per_doc = rows * 12 + 4 + (4 * f.minhash.num_perm if f.dedup == "minhash" else 0)
    return text_bytes / BYTES_PER_DOCUMENT * per_doc
