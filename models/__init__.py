"""Sequential recommenders, one per file (SASRec, CL4SRec, LUMOS, SRA-CL, popularity), the losses
beside them, and the one factory that builds them by name (:mod:`lumosrec.models.factory`)."""
