"""What servemesh tells operators about itself: traces (OpenTelemetry SDK), structured logs, and the
HTTP endpoint with /metrics and health."""
