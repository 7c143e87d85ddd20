"""Stage 5, the report: `document` (Markdown and self-contained HTML) and `figures` (its plots)."""
