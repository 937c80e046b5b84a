"""Sequential recommenders: SASRec, CL4SRec, baselines, and the losses beside them."""
