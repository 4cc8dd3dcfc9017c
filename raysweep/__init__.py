"""raysweep: sequential-recommender experiments (SASRec, BERT4Rec, GRU4Rec, BPR-MF) swept on Ray Tune."""
