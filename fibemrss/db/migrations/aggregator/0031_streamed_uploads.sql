-- Uploads are stored as they stream in (issue 24): each chunk is copied into the submission's
-- transaction on arrival and the submission row, whose insert needs the round's share lock, is
-- written last, after the stream ended, so nothing is locked while a sender is still sending. The
-- chunks' reference to their submission row is therefore checked at commit, not per row.
ALTER TABLE submission_chunks
    ALTER CONSTRAINT submission_chunks_task_round_hospital_fkey DEFERRABLE INITIALLY DEFERRED;
