"""The layout task (docs/DESIGN.md §6d): data (COCO, PDFs), quality terms, and the task's parts."""
