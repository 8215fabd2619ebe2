"""Evaluations of tttlm models, each a function on models and token tensors behind one `tttlm` subcommand:
loss by token position and the context-length ladder (`positions`), inner-loop telemetry (`telemetry`),
multi-query associative recall (`recall`), throughput and latency (`throughput`), and the Markdown report
that gathers their results (`report`). Every command writes a JSON result and a PNG figure (`results`)."""
