"""Google Cloud glue: Dataflow and Vertex AI arguments, compile and submit (`vertex`), and the
cloud steps that stop their paid jobs when they are stopped (`jobs`)."""
