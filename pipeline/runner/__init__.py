"""What the runners use around the pipeline: flags, console filter, the embedded dataset, and the
run summary and HTML report read back from ML Metadata."""
