"""Developer tools (demo model training, its tasks and corpus). Not part of
the installed server; a package only so that benchmarks can import
``tools.demo_tasks``."""
