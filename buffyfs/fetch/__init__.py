"""Getting bytes: one HTTP attempt, segmented and parallel downloads, reads of
a file still arriving, one refresh, when each source is checked, and the
replica's hub client and follower. Imports store/, never fs/ or http/."""
