"""Profile tools over the public API: SinkCalibration heads (``calibrate``), PAG heads (``headhunter``)."""
