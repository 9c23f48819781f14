"""The job as data: the YAML spec validated into typed objects, and the settings a model decides."""
