"""Reports: Chrome/Perfetto traces and plots (matplotlib is imported only by plots)."""

from entrain.report.trace import chrome_trace, write_chrome_trace

__all__ = ["chrome_trace", "write_chrome_trace"]
