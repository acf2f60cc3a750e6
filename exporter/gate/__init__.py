"""Stage 5, the parity gate: reference vs engine per output (parity), the cases it runs (cases),
task-aware gates (detections, zero-shot, tokens, vision-language), the HTML report, and the
re-run of a bundle's gate (`enginekit parity`)."""
