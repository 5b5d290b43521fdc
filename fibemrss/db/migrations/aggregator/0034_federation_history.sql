-- A study can be run again once its federation finished (issue 25: the next season's training, or
-- the demo run twice against one `fibemrss up`). The finished federation keeps its rounds under an
-- archived name, `{task}@{federation id in hex}` (readable with GetFederationStatus), and the study
-- gets a new federation with a new id: renaming the federation renames its rounds and everything
-- kept of them, so every reference to a round follows its task on update.
ALTER TABLE rounds DROP CONSTRAINT rounds_task_fkey,
    ADD CONSTRAINT rounds_task_fkey FOREIGN KEY (task) REFERENCES federations(task) ON UPDATE CASCADE;
ALTER TABLE submissions DROP CONSTRAINT submissions_task_round_fkey,
    ADD CONSTRAINT submissions_task_round_fkey FOREIGN KEY (task, round) REFERENCES rounds(task, round)
        ON UPDATE CASCADE;
ALTER TABLE submission_chunks DROP CONSTRAINT submission_chunks_task_round_hospital_fkey,
    ADD CONSTRAINT submission_chunks_task_round_hospital_fkey FOREIGN KEY (task, round, hospital)
        REFERENCES submissions(task, round, hospital) ON UPDATE CASCADE DEFERRABLE INITIALLY DEFERRED;
ALTER TABLE aggregates DROP CONSTRAINT aggregates_task_round_fkey,
    ADD CONSTRAINT aggregates_task_round_fkey FOREIGN KEY (task, round) REFERENCES rounds(task, round)
        ON UPDATE CASCADE;
ALTER TABLE mask_keys DROP CONSTRAINT mask_keys_task_round_fkey,
    ADD CONSTRAINT mask_keys_task_round_fkey FOREIGN KEY (task, round) REFERENCES rounds(task, round)
        ON UPDATE CASCADE;
ALTER TABLE round_messages DROP CONSTRAINT round_messages_task_round_fkey,
    ADD CONSTRAINT round_messages_task_round_fkey FOREIGN KEY (task, round) REFERENCES rounds(task, round)
        ON UPDATE CASCADE;
ALTER TABLE round_stages DROP CONSTRAINT round_stages_task_round_fkey,
    ADD CONSTRAINT round_stages_task_round_fkey FOREIGN KEY (task, round) REFERENCES rounds(task, round)
        ON UPDATE CASCADE;
