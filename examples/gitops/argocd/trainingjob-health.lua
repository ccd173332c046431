-- Argo CD health of a ringmaster.dev TrainingJob, from its status (argocd-cm key
-- resource.customizations.health.ringmaster.dev_TrainingJob). Like a batch Job: a
-- training run is Progressing until it succeeds (Healthy) or fails (Degraded).
local hs = {status = "Progressing", message = "Waiting for the operator"}
if obj.status == nil then
  return hs
end
local generation = obj.metadata.generation
if generation ~= nil and (obj.status.observedGeneration == nil or obj.status.observedGeneration < generation) then
  hs.message = "Waiting for the operator to observe generation " .. generation
  return hs
end
local conditions = {}
for _, condition in ipairs(obj.status.conditions or {}) do
  conditions[condition.type] = condition
end
local function said(type)
  local condition = conditions[type]
  if condition ~= nil and condition.message ~= nil and condition.message ~= "" then
    return condition.message
  end
  return nil
end
local phase = obj.status.phase
if phase == "Succeeded" then
  hs.status = "Healthy"
  hs.message = said("Succeeded") or "Training finished"
elseif phase == "Failed" then
  hs.status = "Degraded"
  hs.message = said("Failed") or "Training failed"
elseif phase == "Suspended" then
  hs.status = "Suspended"
  hs.message = said("Suspended") or "Suspended"
elseif phase == "Restarting" then
  hs.message = said("Restarting") or "Restarting the gang"
elseif phase == "Running" then
  local progress = obj.status.progress
  if progress ~= nil and progress.epoch ~= nil and progress.totalEpochs ~= nil then
    hs.message = "Training: epoch " .. progress.epoch .. "/" .. progress.totalEpochs
  else
    hs.message = "Training: " .. (obj.status.workersReady or "") .. " workers running"
  end
else
  -- Pending: the scheduler's reason when the gang cannot be placed yet.
  hs.message = said("Scheduled") or said("Reconciling") or "Creating and placing the gang"
end
return hs
